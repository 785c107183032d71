"""`posttrain-jax export`: a run checkpoint (or an averaged one) -> Hugging Face directory or PEFT adapter."""

from __future__ import annotations

from posttrain_jax.checkpointing import read_metadata, resolve_step_dir
from posttrain_jax.models import export_hf
from posttrain_jax.models.from_config import load_checkpoint_model
from posttrain_jax.models.lora_runs import LORA_KEY


# Tokenizer files transformers reads from a model directory (its own chat template included).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "tokenizer.model")


def export_checkpoint(path: str, out: str, *, dtype: str | None = None, ema: bool = False,
                      peft: bool = False) -> None:
    """Write a run checkpoint as a Hugging Face directory (a LoRA run's adapters merged into the weights),
    with the run's HF tokenizer files next to it; with `peft`, a LoRA run's adapters as a PEFT adapter
    directory for its base instead.

    A reward model (scalar head) gets the tokenizer's pad id (else its eos)
    as ``pad_token_id`` when the model config has none: transformers'
    ``*ForSequenceClassification`` needs it to find the last non-pad token
    of a padded batch, where the reward is read.
    """
    import json
    import os
    import shutil

    from posttrain_jax.models.lora import LoraConfig, has_adapters
    from posttrain_jax.models.lora_io import export_merged, write_peft_adapter

    model = load_checkpoint_model(path, ema=ema)
    if peft:
        meta = read_metadata(resolve_step_dir(path)) or {}
        if LORA_KEY not in meta:
            raise ValueError(f"{path} is not a LoRA run: --peft exports adapters; export it without --peft")
        spec = meta[LORA_KEY]
        base = spec["base"]["hf_path"] or spec["base"]["checkpoint"] or spec["base"]["preset"]
        write_peft_adapter(model, LoraConfig(**spec["config"]), out, base_model=base, dtype=dtype or "float32")
        return
    if has_adapters(model):
        export_merged(model, out, dtype=dtype)
    else:
        export_hf(model, out, dtype=dtype)
    saved = (read_metadata(resolve_step_dir(path)) or {}).get("config") or {}
    tokenizer_path = saved.get("tokenizer")
    if not tokenizer_path or not os.path.exists(tokenizer_path):
        return
    directory = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        for name in _TOKENIZER_FILES:
            if os.path.isfile(os.path.join(directory, name)):
                shutil.copy(os.path.join(directory, name), os.path.join(out, name))
    if model.config.head == "scalar" and model.config.pad_token_id is None:
        from posttrain_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        if pad is not None:
            config_path = os.path.join(out, "config.json")
            with open(config_path) as f:
                config = json.load(f)
            config["pad_token_id"] = pad
            with open(config_path, "w") as f:
                json.dump(config, f, indent=2)
