"""`posttrain-jax export`: a run checkpoint (or an averaged one) -> Hugging Face directory."""

from __future__ import annotations

from flax import nnx

from posttrain_jax.checkpointing import MODEL_CONFIG_KEY, abstract_target, load_params, read_metadata
from posttrain_jax.checkpointing import resolve_step_dir
from posttrain_jax.models import abstract_model, export_hf, model_shardings
from posttrain_jax.trainers.common import model_config_from_dict


def load_checkpoint_model(path: str, *, mesh=None, ema: bool = False, step: int | None = None):
    """The model saved in a run checkpoint: config from its metadata, params restored into shardings."""
    step_dir = resolve_step_dir(path, step)
    meta = read_metadata(step_dir) or {}
    if MODEL_CONFIG_KEY not in meta:
        raise ValueError(f"checkpoint {step_dir} has no '{MODEL_CONFIG_KEY}' in its metadata; "
                         f"was it written by a posttrain-jax trainer or `average`?")
    config = model_config_from_dict(meta[MODEL_CONFIG_KEY])
    graphdef, abstract = abstract_model(config)
    target = abstract_target(abstract, model_shardings(config, mesh))
    params = load_params(step_dir, target=target, params_key="ema_params" if ema else "params")
    return nnx.merge(graphdef, params)


# Tokenizer files transformers reads from a model directory (its own chat template included).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "tokenizer.model")


def export_checkpoint(path: str, out: str, *, dtype: str | None = None, ema: bool = False) -> None:
    """Write a run checkpoint as a Hugging Face directory, with the run's HF tokenizer files next to it.

    A reward model (scalar head) gets the tokenizer's pad id (else its eos)
    as ``pad_token_id`` when the model config has none: transformers'
    ``*ForSequenceClassification`` needs it to find the last non-pad token
    of a padded batch, where the reward is read.
    """
    import json
    import os
    import shutil

    model = load_checkpoint_model(path, ema=ema)
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
