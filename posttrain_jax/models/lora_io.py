"""LoRA adapters as PEFT adapter directories, and merged Hugging Face exports.

A PEFT LoRA adapter directory (what `peft.PeftModel.from_pretrained` reads) is
`adapter_config.json` + `adapter_model.safetensors` with tensors named
`base_model.model.<module>.lora_A.weight` [rank, in] and `...lora_B.weight`
[out, rank], torch Linear layout, where `<module>` is the transformers name of
the projection (`model.layers.3.self_attn.q_proj`). Our A is [in..., rank] and
B [rank, out...] with heads kept as axes, flattened the way `models/hf.py`
flattens the kernels (heads major, head_dim minor).
"""

from __future__ import annotations

import json
import logging
import os
import re

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from posttrain_jax.models.lora import (PROJECTIONS, LoraConfig, _projection_modules, adapter_arrays, layer_index,
                                       merge_adapters)

log = logging.getLogger(__name__)
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_LAYER = re.compile(r"^blocks\.(\d+)\.(attn|mlp)\.(\w+)$")
_PEFT_NAME = re.compile(r"^base_model\.model\.(?:model\.)?layers\.(\d+)\.((?:self_attn|mlp)\.\w+_proj)\."
                        r"lora_([AB])\.weight$")
_SHORT = {v[2]: k for k, v in PROJECTIONS.items()}  # "self_attn.q_proj" -> "q"


def _hf_module(path: str) -> str:
    """`blocks.3.attn.q` -> `model.layers.3.self_attn.q_proj`."""
    match = _LAYER.match(path)
    if not match:
        raise ValueError(f"adapter on {path}: only per-layer attention/MLP projections map to PEFT names")
    return f"model.layers.{match.group(1)}.{PROJECTIONS[match.group(3)][2]}"


def to_peft_tensors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our A [in..., r], B [r, out...] -> PEFT lora_A.weight [r, in], lora_B.weight [out, r]."""
    rank = a.shape[-1]
    return (np.ascontiguousarray(a.reshape(-1, rank).T), np.ascontiguousarray(b.reshape(rank, -1).T))


def write_peft_adapter(model: nnx.Module, lora: LoraConfig, out: str, *, base_model: str = "",
                       dtype: str = "float32") -> None:
    """Write `out/adapter_config.json` + `out/adapter_model.safetensors` for peft (LM head models).

    Every process must call it (sharded adapters are gathered); process 0 writes.
    Raises ValueError for a reward model (its trained score head has no PEFT LoRA equivalent here:
    export it merged instead) or a quantized base (PEFT would apply the adapters to the fp base).
    """
    if model.config.head != "lm":
        raise ValueError("a PEFT adapter export is for causal LMs; export a reward model merged (--merged)")
    arrays = adapter_arrays(model)
    tensors, modules = {}, set()
    for path, (a, b) in arrays.items():
        module = _hf_module(path)
        modules.add(module.rsplit(".", 1)[-1])
        peft_a, peft_b = to_peft_tensors(a, b)
        tensors[f"base_model.model.{module}.lora_A.weight"] = peft_a.astype(dtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = peft_b.astype(dtype)
    layers = sorted({int(_LAYER.match(p).group(1)) for p in arrays})
    # Every layer with the same projections -> short names; otherwise the exact module names.
    per_layer = {int(_LAYER.match(p).group(1)): set() for p in arrays}
    for p in arrays:
        per_layer[int(_LAYER.match(p).group(1))].add(p.rsplit(".", 1)[-1])
    uniform = len({frozenset(v) for v in per_layer.values()}) == 1 and len(layers) == model.config.num_layers
    targets = sorted(modules) if uniform else sorted(_hf_module(p) for p in arrays)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
        save_file(tensors, os.path.join(out, WEIGHTS_FILE), metadata={"format": "pt"})


def read_peft_config(path: str) -> LoraConfig:
    """The LoraConfig of a PEFT adapter directory (rank, alpha, dropout, target projections)."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} does not exist: expected a PEFT adapter directory")
    with open(file) as f:
        raw = json.load(f)
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type {raw.get('peft_type')!r}; only LORA adapters can be imported")
    for key, unsupported in (("use_dora", True), ("use_rslora", True), ("fan_in_fan_out", True)):
        if raw.get(key) == unsupported:
            raise ValueError(f"{file}: {key}={unsupported} is not supported")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise ValueError(f"{file}: per-module rank_pattern / alpha_pattern are not supported")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias={raw['bias']!r} is not supported (only 'none')")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):
        raise ValueError(f"{file}: a regex target_modules is not supported; list the module names")
    ours = []
    for t in targets:
        short = t.rsplit(".", 1)[-1]
        kind = next((k for k, v in PROJECTIONS.items() if v[2].endswith("." + short)), None)
        if kind is None:
            raise ValueError(f"{file}: target module {t!r} is not an attention/MLP projection of this model")
        layer = re.search(r"layers\.(\d+)\.", t)
        group = "attn" if kind in ("q", "k", "v", "o") else "mlp"
        ours.append(rf"blocks\.{layer.group(1)}\.{group}\.{kind}" if layer else rf"{group}\.{kind}")
    return LoraConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0.0)),
                      targets="(" + "|".join(sorted(set(ours))) + ")$")


def read_peft_adapter(model: nnx.Module, path: str) -> nnx.Module:
    """Set the adapters of `model` (made with `read_peft_config(path)`) from a PEFT directory, in place.

    Raises ValueError naming the tensor when a name, a shape or the set of adapted modules differs.
    """
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} does not exist (only safetensors PEFT adapters are read)")
    tensors = load_file(file)
    wanted = {}
    for name in tensors:
        match = _PEFT_NAME.match(name)
        if not match:
            raise ValueError(f"{file}: tensor {name!r} is not a LoRA A/B of a layer projection")
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        wanted.setdefault((layer, _SHORT[module]), {})[which] = tensors[name]
    seen = set()
    for prefix, module, names in _projection_modules(model):
        for name in names:
            lora_a = getattr(module, name + "_lora_a", None)
            if lora_a is None:
                continue
            a_full, b_full = lora_a[...], getattr(module, name + "_lora_b")[...]
            stacked = a_full.ndim - 1 - PROJECTIONS[name][0]
            layers = ([layer_index(model, prefix, g) for g in range(a_full.shape[0])] if stacked
                      else [layer_index(model, prefix)])
            a_new, b_new = [], []
            for layer in layers:
                pair = wanted.get((layer, name))
                if pair is None or set(pair) != {"A", "B"}:
                    raise ValueError(f"{file}: no lora_A/lora_B for layer {layer} {PROJECTIONS[name][2]}, "
                                     f"which this model adapts")
                seen.add((layer, name))
                a_shape = a_full.shape[stacked:]
                b_shape = b_full.shape[stacked:]
                rank = a_shape[-1]
                if pair["A"].shape != (rank, int(np.prod(a_shape[:-1]))) or \
                        pair["B"].shape != (int(np.prod(b_shape[1:])), rank):
                    raise ValueError(f"{file}: layer {layer} {PROJECTIONS[name][2]} has A {pair['A'].shape}, "
                                     f"B {pair['B'].shape}; this model expects rank {rank} and A {a_shape}, "
                                     f"B {b_shape} (ours)")
                a_new.append(pair["A"].T.reshape(a_shape))
                b_new.append(pair["B"].T.reshape(b_shape))
            a_host = np.stack(a_new) if stacked else a_new[0]
            b_host = np.stack(b_new) if stacked else b_new[0]
            for var, host in ((lora_a, a_host), (getattr(module, name + "_lora_b"), b_host)):
                old = var[...]
                host = host.astype(old.dtype)
                var.set_value(jax.make_array_from_callback(old.shape, old.sharding, lambda idx, h=host: h[idx]))
    extra = sorted(set(wanted) - seen)
    if extra:
        raise ValueError(f"{file}: adapters for {len(extra)} modules this model does not adapt, e.g. "
                         f"layer {extra[0][0]} {PROJECTIONS[extra[0][1]][2]}")
    return model


def export_merged(model: nnx.Module, out: str, *, dtype: str | None = None) -> None:
    """A plain Hugging Face directory of W + (alpha/r) A B (a quantized base is dequantized first)."""
    from posttrain_jax.models.hf import export_hf
    export_hf(merge_adapters(model), out, dtype=dtype)
