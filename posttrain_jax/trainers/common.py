"""Wiring the trainers share: mesh, tokenizer, model and checkpoint directory from config."""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import ml_collections
from ml_collections import config_dict
from flax import nnx

from posttrain_jax.checkpointing import (MODEL_CONFIG_KEY, abstract_target, load_params, read_metadata,
                                        resolve_step_dir)
from posttrain_jax.mesh import make_mesh
from posttrain_jax.models import Decoder, create_model, load_hf, preset
from posttrain_jax.sharding import DEFAULT_RULES, normalize_rules

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
        # Attention kernel: auto (splash on TPU, cuDNN on GPU where it applies, else xla / blocked
        # for long rows) | xla | blocked | splash | cudnn; see posttrain_jax/models/attention.py.
        attention="auto",
    ))


def base_config(output_dir: str) -> ml_collections.ConfigDict:
    """The sections every trainer has: output, seed, mesh, sharding rules, model, tokenizer, template."""
    c = ml_collections.ConfigDict()
    c.output_dir = output_dir
    c.seed = 0
    # -1 fills the devices; dcn_* split an axis across TPU slices (multi-slice), 1 = one slice.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1,
                                        "dcn_tensor": 1, "num_devices": 0})
    c.sharding_rules = []  # (logical_name, mesh_axes) pairs that take precedence over the defaults
    c.model = model_config()
    c.tokenizer = ""  # a SentencePiece .model or HF tokenizer.json / directory
    # "auto": the tokenizer's own template, else the built-in of its model type; or a built-in name / .jinja file.
    c.chat_template = "auto"
    return c


def mesh_and_rules(config):
    shape = dict(config.mesh)
    # num_devices > 0: a mesh over this process's first devices only (one process; e.g. the ablation's
    # 1- vs 2-device cells in a process that has 8).
    num_devices = int(shape.pop("num_devices", 0) or 0)
    devices = None
    if num_devices:
        if jax.process_count() > 1 or num_devices > jax.device_count():
            raise ValueError(f"mesh.num_devices={num_devices}: needs one process with at least that many devices "
                             f"(this is process {jax.process_index()} of {jax.process_count()} with "
                             f"{jax.device_count()} devices); set it to 0 to use every device")
        devices = jax.devices()[:num_devices]
    mesh = make_mesh(shape, devices=devices)
    rules = normalize_rules(tuple(tuple(r) for r in config.sharding_rules)) + DEFAULT_RULES
    return mesh, rules


def data_shards(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def build_model(cfg: ml_collections.ConfigDict, mesh, rules, *, seed: int, head: str = "lm",
                vocab_size: int | None = None) -> Decoder:
    """The model named by the `model` section, created or loaded straight into its shardings."""
    numerics = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat,
                    scan_layers=cfg.get("scan_layers", True), attention=cfg.get("attention", "auto"))
    if cfg.hf_path:
        return load_hf(cfg.hf_path, mesh=mesh, rules=rules, head=head, dtype=cfg.param_dtype,
                       compute_dtype=cfg.dtype, remat=cfg.remat, scan_layers=numerics["scan_layers"],
                       attention=numerics["attention"])
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


def model_config_to_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def model_config_from_dict(d: dict):
    from posttrain_jax.models.config import ModelConfig, RopeConfig
    d = dict(d)
    d["rope"] = RopeConfig(**d["rope"])
    d["local_rope"] = RopeConfig(**d["local_rope"]) if d.get("local_rope") else None
    for key in ("layer_types", "eos_token_id"):
        if isinstance(d.get(key), list):
            d[key] = tuple(d[key])
    return ModelConfig(**d)


def run_metadata(config, model) -> dict:
    return {MODEL_CONFIG_KEY: model_config_to_dict(model.config), "config": json.loads(config.to_json()),
            "process_count": jax.process_count()}
