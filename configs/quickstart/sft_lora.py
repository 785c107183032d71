"""LoRA / QLoRA SFT quickstart.

    posttrain-jax sft --config configs/quickstart/sft_lora.py
        the CPU quickstart task with rank-16 adapters on the quickstart model (base frozen)
    posttrain-jax sft --config configs/quickstart/sft_lora.py:gemma3 --config.model.hf_path=/models/gemma-3-270m-it
        QLoRA (NF4 base) of Gemma 3 270M on the same arithmetic task, its own tokenizer and chat template

Export: `posttrain-jax export --checkpoint runs/lora-sft-quickstart --out merged` (add `--peft` for a
PEFT adapter directory that `peft.PeftModel.from_pretrained` applies to the base).
"""

import os

from posttrain_jax.trainers.sft import default_config


def get_config(variant: str = "quickstart"):
    c = default_config()
    c.output_dir = "runs/lora-sft-quickstart"
    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.optim.learning_rate = 1e-2  # adapters start at zero (B = 0) and want a larger step than full weights
    if variant == "quickstart":
        return c
    if variant != "gemma3":
        raise ValueError(f"unknown variant {variant!r}: use 'quickstart' or 'gemma3'")
    c.output_dir = "runs/qlora-gemma3-270m"
    c.model.hf_path = os.environ.get("POSTTRAIN_JAX_GEMMA_DIR", "")  # or --config.model.hf_path=...
    c.model.dtype = "bfloat16"  # compute; the adapters train in float32
    c.lora.quantize_base = "nf4"
    c.chat_template = "gemma"
    # The arithmetic task without its own tokenizer: data written by `sft` (quickstart_task) is tokenizer-free
    # chat JSONL; the tokenizer is the model's.
    c.data.quickstart_num_train = 20000
    c.data.seq_len = 128
    c.train.global_batch = 16
    c.train.steps = 300
    c.optim.learning_rate = 2e-4
    return c
