"""Llama 3 DPO (Llama 3 paper §4.1.4): DPO + 0.2 x NLL on chosen, beta 0.1, lr 1e-5.

Formatting tokens (header and end-of-turn) are masked out of both responses'
loss, and only the two strongest preference levels are kept, as in the paper.
The paper does not say how the NLL term is normalised; "token" follows TRL.
Set: --config.model.checkpoint=... (the SFT model) --config.tokenizer=...
--config.data.sources='[{"path": "/data/prefs.jsonl"}]' (rows with a `strength`).
"""

from posttrain_jax.trainers.dpo import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/llama3-dpo"
    c.model.preset = "llama3.1-8b"
    c.model.checkpoint = ""
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.tokenizer = ""
    c.chat_template = "llama3"
    c.data.quickstart_task = False
    c.data.sft_eval_path = ""
    c.data.seq_len = 8192
    c.data.mask_special_tokens = True
    c.data.keep_strengths = ["significantly better", "better"]
    c.train.global_pairs = 64
    c.train.loss_type = "sigmoid"
    c.train.beta = 0.1
    c.train.nll_coef = 0.2
    c.train.nll_normalization = "token"
    c.train.loss_chunk_size = 0  # automatic: the fused LM head holds ~128 MiB of logits per device at a time
    c.optim.learning_rate = 1e-5
    c.optim.warmup_ratio = 0.0
    c.optim.schedule = "linear"
    return c
