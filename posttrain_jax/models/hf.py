"""Hugging Face checkpoints: load a local directory into sharded params, export back.

Tensors are read one at a time from the safetensors files (memory stays near
one tensor on the host) and each device receives only its own shard via
`jax.make_array_from_callback`, so the same code loads on a laptop and on a
multi-host pod (every host reads the same files from shared storage).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from posttrain_jax.models.build import abstract_model, model_shardings
from posttrain_jax.models.config import ModelConfig
from posttrain_jax.models.hf_config import from_hf_config, to_hf_config
from posttrain_jax.models.stacking import layer_sharding, scanned_location, stack_program
from posttrain_jax.models.transformer import Decoder
from posttrain_jax.sharding import DEFAULT_RULES, Rules

log = logging.getLogger(__name__)

# Checkpoint entries that carry no parameters of ours and may be skipped knowingly.
_IGNORABLE = re.compile(r"(rotary_emb\.inv_freq$|vision_tower\.|multi_modal_projector\.)")


def _param_names(c: ModelConfig, prefix: str = "model.", head_prefix: str = "") -> dict[str, tuple[str, str]]:
    """Our parameter path -> (HF tensor name, layout kind)."""
    names = {"embed": (f"{prefix}embed_tokens.weight", "same"), "final_norm.scale": (f"{prefix}norm.weight", "same")}
    if c.head == "scalar":
        names["score"] = (f"{head_prefix}score.weight", "dense")
    elif not c.tie_embeddings:
        names["lm_head"] = (f"{head_prefix}lm_head.weight", "dense")
    for i in range(c.num_layers):
        ours, hf = f"blocks.{i}.", f"{prefix}layers.{i}."
        names[ours + "attn_norm.scale"] = (hf + "input_layernorm.weight", "same")
        if c.sandwich_norm:
            names[ours + "post_attn_norm.scale"] = (hf + "post_attention_layernorm.weight", "same")
            names[ours + "mlp_norm.scale"] = (hf + "pre_feedforward_layernorm.weight", "same")
            names[ours + "post_mlp_norm.scale"] = (hf + "post_feedforward_layernorm.weight", "same")
        else:
            names[ours + "mlp_norm.scale"] = (hf + "post_attention_layernorm.weight", "same")
        for p in ("q", "k", "v"):
            names[ours + f"attn.{p}"] = (hf + f"self_attn.{p}_proj.weight", "in_heads")
            if c.qkv_bias:
                names[ours + f"attn.{p}_bias"] = (hf + f"self_attn.{p}_proj.bias", "bias_heads")
        names[ours + "attn.o"] = (hf + "self_attn.o_proj.weight", "out_heads")
        if c.o_bias:
            names[ours + "attn.o_bias"] = (hf + "self_attn.o_proj.bias", "same")
        if c.qk_norm:
            names[ours + "attn.q_norm.scale"] = (hf + "self_attn.q_norm.weight", "same")
            names[ours + "attn.k_norm.scale"] = (hf + "self_attn.k_norm.weight", "same")
        for p in ("gate", "up", "down"):
            names[ours + f"mlp.{p}"] = (hf + f"mlp.{p}_proj.weight", "dense")
            if c.mlp_bias:
                names[ours + f"mlp.{p}_bias"] = (hf + f"mlp.{p}_proj.bias", "same")
    return names


def _layout_names(c: ModelConfig, prefix: str = "model.", head_prefix: str = "") -> dict[str, tuple[list[str], str]]:
    """Our parameter path in `c`'s layout -> (HF tensor names, layout kind).

    A scanned stack (`layers.<j>.X`, see models/stacking.py) lists one HF name per
    group, in stacking order; every other parameter lists exactly one.
    """
    per_layer = _param_names(c, prefix, head_prefix)
    if not c.scan_layers:
        return {ours: ([hf], kind) for ours, (hf, kind) in per_layer.items()}
    out: dict[str, tuple[list[str], str]] = {}
    for ours, (hf, kind) in per_layer.items():
        if not ours.startswith("blocks."):
            out[ours] = ([hf], kind)
            continue
        _, layer, rest = ours.split(".", 2)
        where, _ = scanned_location(c, int(layer))
        out.setdefault(f"{where}.{rest}", ([], kind))[0].append(hf)  # layers come in order: g ascending
    return out


def _to_ours(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "same":
        return w
    if kind == "dense":  # torch Linear stores [out, in]
        return w.T
    if kind == "in_heads":  # [heads*head_dim, embed] -> [embed, heads, head_dim]
        return w.T.reshape(shape)
    if kind == "bias_heads":
        return w.reshape(shape)
    if kind == "out_heads":  # [embed, heads*head_dim] -> [heads, head_dim, embed]
        return w.T.reshape(shape)
    raise AssertionError(kind)


def _to_hf(kind: str, w: np.ndarray) -> np.ndarray:
    if kind in ("same",):
        return w
    if kind == "dense":
        return np.ascontiguousarray(w.T)
    if kind == "in_heads":
        return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)
    if kind == "bias_heads":
        return w.reshape(-1)
    if kind == "out_heads":
        return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)
    raise AssertionError(kind)


def _expected_hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the HF tensor for one of our parameters (the inverse of `_to_ours`)."""
    if kind == "same":
        return tuple(shape)
    if kind == "dense":
        return tuple(reversed(shape))
    if kind == "in_heads":
        return (shape[1] * shape[2], shape[0])
    if kind == "bias_heads":
        return (shape[0] * shape[1],)
    if kind == "out_heads":
        return (shape[2], shape[0] * shape[1])
    raise AssertionError(kind)


class _Checkpoint:
    """Lazy access to the tensors of all safetensors files in a directory."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {name: os.path.join(path, fn) for name, fn in weight_map.items()}
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise FileNotFoundError(f"{path}: no *.safetensors files (and no model.safetensors.index.json)")
            self.files = {}
            for fn in files:
                with safe_open(fn, "numpy") as f:
                    self.files.update({name: fn for name in f.keys()})
        self._open: dict[str, Any] = {}

    def get(self, name: str) -> np.ndarray:
        fn = self.files[name]
        if fn not in self._open:
            self._open[fn] = safe_open(fn, "numpy")
        return self._open[fn].get_tensor(name)

    def close(self):
        self._open.clear()


def _flat_paths(state) -> dict[str, nnx.Variable]:
    flat = {}
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        flat[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = var
    return flat


def _prefixes(ckpt: _Checkpoint) -> tuple[str, str]:
    for prefix, head_prefix in (("model.", ""), ("model.language_model.", ""), ("language_model.model.",
                                                                                 "language_model.")):
        if prefix + "embed_tokens.weight" in ckpt.files:
            return prefix, head_prefix
    raise ValueError("checkpoint has no embed_tokens.weight under model., model.language_model. or "
                     "language_model.model.; is this a decoder-only language model?")


def load_hf(path: str, *, mesh: Mesh | None = None, dtype: str | None = None, compute_dtype: str | None = None,
            rules: Rules = DEFAULT_RULES, head: str | None = None, seed: int = 0, **overrides) -> Decoder:
    """Load a local Hugging Face checkpoint directory into a (sharded) `Decoder`.

    dtype: parameter dtype (default float32 master weights); compute_dtype: activations.
    head: "lm" or "scalar" to override the checkpoint's head (a reward model initialised
    from a causal LM gets a fresh scalar head; its LM head is skipped and logged).
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: expected a Hugging Face model directory")
    with open(config_path) as f:
        raw = json.load(f)
    kw = dict(overrides)
    if dtype:
        kw["param_dtype"] = dtype
    if compute_dtype:
        kw["dtype"] = compute_dtype
    if head:
        kw["head"] = head
    try:
        config = from_hf_config(raw, **kw)
    except (KeyError, ValueError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e).removeprefix("config.json: ")
        raise ValueError(f"{config_path}: {detail}") from e
    ckpt = _Checkpoint(path)
    prefix, head_prefix = _prefixes(ckpt)
    names = _layout_names(config, prefix, head_prefix)
    graphdef, abstract = abstract_model(config)
    shardings = _flat_paths(model_shardings(config, mesh, rules))
    flat = _flat_paths(abstract)
    fresh = {}

    def fresh_params():  # a reward model starting from a causal LM: its scalar head from random init
        if not fresh:
            fresh.update(_flat_paths(nnx.state(Decoder(config, rngs=nnx.Rngs(seed)))))
        return fresh

    values = {}
    for ours, var in flat.items():
        hf_names, kind = names[ours]
        sharding = shardings[ours].get_raw_value()
        if not ours.startswith("layers."):
            values[ours] = _load_one(ckpt, path, hf_names[0], kind, ours, var.shape, var.dtype, sharding,
                                     fresh_params)
            continue
        # A scanned stack: one device array per layer (host memory stays near one tensor), stacked on device.
        one_layer = layer_sharding(sharding)
        layers = [_load_one(ckpt, path, hf, kind, ours, var.shape[1:], var.dtype, one_layer, None)
                  for hf in hf_names]
        values[ours] = stack_program(sharding)(*layers)
        del layers
    used = {hf for hf_names, _ in names.values() for hf in hf_names}
    unused = [n for n in ckpt.files if n not in used]
    skipped = [n for n in unused if _IGNORABLE.search(n) or n.endswith("lm_head.weight")
               or n.endswith("score.weight")]
    unexpected = sorted(set(unused) - set(skipped))
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} tensors have no place in a {config.family} model, "
                         f"e.g. {unexpected[:5]}; is config.json from the same model as the weights?")
    if skipped:
        log.info("%s: skipped %d tensors that this model does not use (e.g. %s)", path, len(skipped), skipped[0])
    ckpt.close()
    state = jax.tree_util.tree_map_with_path(
        lambda p, v: v.replace(values[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)]),
        abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def _load_one(ckpt: _Checkpoint, path: str, hf_name: str, kind: str, ours: str, shape, dtype, sharding,
              fresh) -> jax.Array:
    """One HF tensor as our (sharded) array of `shape`; `fresh` supplies a missing scalar head."""
    if hf_name not in ckpt.files:
        if ours == "score" and fresh is not None:
            log.warning("%s: no %s; the scalar head starts from random init", path, hf_name)
            host = np.asarray(fresh()[ours][...])
        else:
            raise ValueError(f"{path}: tensor {hf_name} is missing (needed for {ours}); "
                             f"is config.json from the same model as the weights?")
    else:
        w = ckpt.get(hf_name)
        expected = _expected_hf_shape(kind, shape)
        if tuple(w.shape) != expected:
            raise ValueError(f"{path}: tensor {hf_name} in {os.path.basename(ckpt.files[hf_name])} has shape "
                             f"{tuple(w.shape)} but config.json implies {expected}")
        host = _to_ours(kind, w, shape)
    host = np.asarray(host).astype(dtype)
    return jax.make_array_from_callback(tuple(shape), sharding, lambda idx: host[idx])


def _host_value(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def export_hf(model: Decoder, path: str, *, dtype: str | None = None,
              max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write config.json + safetensors (sharded with an index when large) for transformers.

    Every process must call this (gathering sharded params is collective); only
    process 0 writes.
    """
    config: ModelConfig = model.config
    dtype = dtype or config.param_dtype
    names = _layout_names(config)
    # One entry per HF tensor: (our path, layer of a stack or None).
    flat_params = _flat_paths(nnx.state(model, nnx.Param))
    entries = [(ours, g if ours.startswith("layers.") else None)
               for ours in flat_params for g in range(len(names[ours][0]))]
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    shape_of = lambda ours, g: flat_params[ours].shape[1:] if g is not None else flat_params[ours].shape  # noqa: E731
    sizes = {entry: int(np.prod(shape_of(*entry))) * np_dtype.itemsize for entry in entries}
    shards, current, current_bytes = [], [], 0
    for entry in entries:  # plan the files first so their names can say "of N"
        if current and current_bytes + sizes[entry] > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += sizes[entry]
    shards.append(current)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(to_hf_config(config, torch_dtype=dtype), f, indent=2)
    weight_map = {}
    for n, group in enumerate(shards, 1):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for ours, g in group:
            hf_names, kind = names[ours]
            value = flat_params[ours][...]
            # One layer of a stack at a time: host memory stays near one HF tensor.
            host = _host_value(value if g is None else value[g]).astype(np_dtype)
            tensors[hf_names[g or 0]] = _to_hf(kind, host)
            weight_map[hf_names[g or 0]] = filename
        if writer:
            save_file(tensors, os.path.join(path, filename), metadata={"format": "pt"})
    if writer and len(shards) > 1:
        total = sum(sizes.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
