"""The `lora` config section and adapter runs: build, record, reload.

A LoRA run's checkpoints hold only the trained params (the adapters, plus a
reward model's scalar head) and their optimizer state. Its metadata records
the LoRA config and a reference to the base weights (an absolute Hugging Face
directory, a full run checkpoint, or a preset and seed), from which every
reader (`export`, `sample`, `score`, `rejection-sample`, a DPO/GRPO run
starting from it) rebuilds base + adapters.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import ml_collections
from flax import nnx

from posttrain_jax.checkpointing import MODEL_CONFIG_KEY, abstract_target, load_params, read_metadata
from posttrain_jax.checkpointing import resolve_step_dir
from posttrain_jax.models.lora import (DEFAULT_TARGETS, LoraConfig, apply_lora, has_adapters, merge_adapters,
                                       trainable_filter)

log = logging.getLogger(__name__)
LORA_KEY = "lora"


def lora_section() -> ml_collections.ConfigDict:
    """The `lora` section every trainer has (off by default)."""
    return ml_collections.ConfigDict(dict(
        enabled=False,
        rank=16,
        alpha=32.0,  # adapters are scaled by alpha / rank
        targets=DEFAULT_TARGETS,  # regex over projection paths: "layers.0.attn.q" (scanned), "blocks.3.attn.q"
        dropout=0.0,  # on each adapter's input during training
        quantize_base="none",  # none | int8 | nf4 (QLoRA): the frozen projections, quantized once at load
        adapter="",  # continue from a PEFT adapter directory (its rank / alpha / targets win)
    ))


def lora_config_of(section) -> LoraConfig:
    if section.adapter:
        from posttrain_jax.models.lora_io import read_peft_config
        imported = read_peft_config(section.adapter)
        return dataclasses.replace(imported, quantize_base=section.quantize_base, dropout=section.dropout)
    return LoraConfig(rank=section.rank, alpha=section.alpha, targets=section.targets, dropout=section.dropout,
                      quantize_base=section.quantize_base)


def _adapter_run_meta(model_section) -> dict | None:
    if not model_section.checkpoint:
        return None
    meta = read_metadata(resolve_step_dir(model_section.checkpoint)) or {}
    return meta if LORA_KEY in meta else None


def lora_spec(config) -> dict | None:
    """What a LoRA run records under metadata["lora"]: {"config": LoraConfig fields, "base": reference};
    None for a full fine-tune. The base is the `model` section as given (absolute paths): rebuilt with
    `build_model`, so a base that is itself an adapter run comes back merged, as it was trained on."""
    section, model = config.get("lora"), config.model
    if section is None or not section.enabled:
        return None
    base = dict(preset=model.preset, hf_path=os.path.abspath(model.hf_path) if model.hf_path else "",
                checkpoint=os.path.abspath(model.checkpoint) if model.checkpoint else "", seed=config.seed)
    return {"config": lora_config_of(section).to_dict(), "base": base}


def build_with_lora(model_section, mesh, rules, *, seed: int, head: str, lora, build_base, merge: bool = True):
    """The model for a trainer: base (+ adapters). `build_base(section, seed, head)` builds a full model.

    A `model.checkpoint` written by a LoRA run is its base + its adapters; for training they
    are merged into the weights (the start of this run, and what a DPO/GRPO reference must
    be), and an enabled `lora` section adds fresh adapters on top. `merge=False` keeps them
    unmerged (sampling from an adapter run).
    """
    saved = _adapter_run_meta(model_section)
    if saved is not None:
        numerics = {k: v for k, v in model_section.items() if k not in ("preset", "hf_path", "checkpoint")}
        model = load_adapter_run(resolve_step_dir(model_section.checkpoint), saved, mesh, rules, head=head,
                                 numerics=numerics, build_base=build_base)
        if not merge:
            return model
        log.info("merging the adapters of %s into its base", model_section.checkpoint)
        model = merge_adapters(model)
    else:
        model = build_base(model_section, seed, head)
    if lora is None or not lora.enabled:
        return model
    cfg = lora_config_of(lora)
    apply_lora(model, cfg, mesh=mesh, rules=rules, seed=seed)
    if lora.adapter:
        from posttrain_jax.models.lora_io import read_peft_adapter
        read_peft_adapter(model, lora.adapter)
        log.info("adapters from %s", lora.adapter)
    return model


def load_adapter_run(step_dir, meta: dict, mesh, rules, *, head: str, numerics: dict, build_base,
                     params_key: str = "params") -> nnx.Module:
    """Base (from the recorded reference) + the adapters (and head) saved at `step_dir`."""
    spec = meta[LORA_KEY]
    base = spec["base"]
    section = ml_collections.ConfigDict(dict(preset=base["preset"], hf_path=base["hf_path"],
                                             checkpoint=base["checkpoint"], **numerics))
    # build_base is `models.from_config.build_model` without adapters: a base that is itself an
    # adapter run comes back merged.
    for key in ("hf_path", "checkpoint"):
        if base[key] and not os.path.exists(base[key]):
            raise FileNotFoundError(f"{step_dir}: the adapters' base model {key}={base[key]} does not exist; "
                                    f"adapter checkpoints hold only the adapters and need their base")
    model = build_base(section, base["seed"], head)
    saved_config = meta.get(MODEL_CONFIG_KEY, {})
    if saved_config and (saved_config.get("num_layers"), saved_config.get("hidden_size")) != (
            model.config.num_layers, model.config.hidden_size):
        raise ValueError(f"{step_dir}: the base at {base} is not the model these adapters were trained on "
                         f"(layers/hidden {model.config.num_layers}/{model.config.hidden_size} vs "
                         f"{saved_config.get('num_layers')}/{saved_config.get('hidden_size')})")
    apply_lora(model, LoraConfig(**spec["config"]), mesh=mesh, rules=rules, seed=base["seed"])
    # A reward model's head is restored too when the run trained one; a new head keeps its fresh init.
    saved_head = saved_config.get("head", head)
    wanted = trainable_filter(head if saved_head == head else "lm")
    target = nnx.state(model, wanted)
    restored = load_params(step_dir, target=abstract_target(target), params_key=params_key)
    nnx.update(model, restored)
    assert has_adapters(model)
    return model
