"""A model from the `model` config section, or from a run checkpoint, created straight into its shardings.

The `model` section names a preset (random init), a Hugging Face directory or a
run checkpoint; `build_model` turns it (and an optional `lora` section, see
`models.lora_runs`) into a sharded `Decoder`. `load_checkpoint_model` reads the
model a run checkpoint holds, from the model config in its metadata.
"""

from __future__ import annotations

import logging

import ml_collections
from flax import nnx
from ml_collections import config_dict

from posttrain_jax.checkpointing import (MODEL_CONFIG_KEY, abstract_target, load_params, read_metadata,
                                        resolve_step_dir)
from posttrain_jax.models.build import abstract_model, create_model, model_shardings
from posttrain_jax.models.config import model_config_from_dict, preset
from posttrain_jax.models.hf import load_hf
from posttrain_jax.models.lora_runs import LORA_KEY, build_with_lora, load_adapter_run
from posttrain_jax.models.transformer import Decoder
from posttrain_jax.sharding import DEFAULT_RULES

log = logging.getLogger(__name__)


def model_config() -> ml_collections.ConfigDict:
    """The `model` section every trainer shares."""
    return ml_collections.ConfigDict(dict(
        preset="quickstart",  # a name from posttrain_jax.models.PRESETS (random init) ...
        hf_path="",  # ... or a local Hugging Face directory ...
        checkpoint="",  # ... or a run checkpoint (its params)
        dtype="float32",  # compute dtype; bfloat16 on TPU
        param_dtype="float32",  # master weights
        # What each block saves for the backward pass: none | full | dots | dots_no_batch | offload
        # (models/config.py REMAT_POLICIES says when to use which); True / False still mean full / none.
        remat=config_dict.FieldReference("none", field_type=object),
        scan_layers=True,  # one lax.scan over the stacked layers; False: the unrolled per-layer oracle
        # How a train step runs the stacked layers: auto (unrolled on CPU, scan elsewhere) | scan | unrolled.
        layer_loop="auto",
        # Attention kernel: auto (splash on TPU, cuDNN on GPU where it applies, else xla / blocked
        # for long rows) | xla | blocked | splash | cudnn; see posttrain_jax/models/attention.py.
        attention="auto",
    ))


def build_model(cfg: ml_collections.ConfigDict, mesh, rules, *, seed: int, head: str = "lm",
                vocab_size: int | None = None, lora: ml_collections.ConfigDict | None = None,
                merge_adapters: bool = True) -> Decoder:
    """The model named by the `model` section, created or loaded straight into its shardings.

    With an enabled `lora` section the base gets adapters (and a quantized base for QLoRA);
    a `model.checkpoint` written by a LoRA run is rebuilt as its base + its adapters (kept
    for a LoRA run or with merge_adapters=False, merged into full weights otherwise).
    """
    def build_base(section, base_seed, base_head):
        if section is not cfg:  # the recorded base of an adapter run: itself possibly an adapter run
            return build_model(section, mesh, rules, seed=base_seed, head=base_head, vocab_size=vocab_size)
        return _build_plain(section, mesh, rules, seed=base_seed, head=base_head, vocab_size=vocab_size)

    return build_with_lora(cfg, mesh, rules, seed=seed, head=head, lora=lora, build_base=build_base,
                           merge=merge_adapters)


def _build_plain(cfg: ml_collections.ConfigDict, mesh, rules, *, seed: int, head: str = "lm",
                 vocab_size: int | None = None) -> Decoder:
    numerics = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat,
                    scan_layers=cfg.get("scan_layers", True), attention=cfg.get("attention", "auto"),
                    layer_loop=cfg.get("layer_loop", "auto"))
    if cfg.hf_path:
        return load_hf(cfg.hf_path, mesh=mesh, rules=rules, head=head, dtype=cfg.param_dtype,
                       compute_dtype=cfg.dtype, remat=cfg.remat, scan_layers=numerics["scan_layers"],
                       attention=numerics["attention"], layer_loop=numerics["layer_loop"])
    if cfg.checkpoint:
        step_dir = resolve_step_dir(cfg.checkpoint)
        meta = read_metadata(step_dir) or {}
        if MODEL_CONFIG_KEY not in meta:
            raise ValueError(f"checkpoint {step_dir} has no model config in its metadata")
        saved = model_config_from_dict(meta[MODEL_CONFIG_KEY])
        model = create_model(saved.replace(head=head, **numerics), mesh=mesh, rules=rules, seed=seed)
        graphdef, params = nnx.split(model, nnx.Param)
        # A head the checkpoint does not have (a reward model from an SFT run) keeps its fresh init.
        heads = {"score", "lm_head"} if saved.head != head else set()
        backbone = nnx.State({k: v for k, v in params.items() if k not in heads})
        restored = load_params(step_dir, target=abstract_target(backbone))
        for key, value in restored.items():
            params[key] = value
        if heads & set(params.keys()):
            log.info("%s: backbone from %s, a fresh %s head", head, step_dir, head)
        return nnx.merge(graphdef, params)
    model_cfg = preset(cfg.preset, head=head, **numerics)
    if vocab_size is not None and model_cfg.vocab_size < vocab_size:
        raise ValueError(f"model.preset {cfg.preset!r} has vocab_size {model_cfg.vocab_size} but the tokenizer has "
                         f"{vocab_size} tokens; pick a preset with a large enough vocabulary")
    return create_model(model_cfg, mesh=mesh, rules=rules, seed=seed)


def load_checkpoint_model(path: str, *, mesh=None, ema: bool = False, step: int | None = None):
    """The model saved in a run checkpoint: config from its metadata, params restored into shardings.

    A LoRA run's checkpoint comes back as its base (rebuilt from the recorded reference)
    with the saved adapters on it (not merged).
    """
    step_dir = resolve_step_dir(path, step)
    meta = read_metadata(step_dir) or {}
    if MODEL_CONFIG_KEY not in meta:
        raise ValueError(f"checkpoint {step_dir} has no '{MODEL_CONFIG_KEY}' in its metadata; "
                         f"was it written by a posttrain-jax trainer or `average`?")
    config = model_config_from_dict(meta[MODEL_CONFIG_KEY])
    params_key = "ema_params" if ema else "params"
    if LORA_KEY in meta:
        numerics = dict(dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat,
                        attention=config.attention, scan_layers=config.scan_layers, layer_loop=config.layer_loop)
        return load_adapter_run(step_dir, meta, mesh, DEFAULT_RULES, head=config.head, numerics=numerics,
                                params_key=params_key,
                                build_base=lambda section, seed, head: build_model(section, mesh, DEFAULT_RULES,
                                                                                   seed=seed, head=head))
    graphdef, abstract = abstract_model(config)
    target = abstract_target(abstract, model_shardings(config, mesh))
    params = load_params(step_dir, target=target, params_key=params_key)
    return nnx.merge(graphdef, params)
