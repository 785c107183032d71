"""LoRA and QLoRA: low-rank adapters on the attention and MLP projections, a quantized frozen base.

A projection `y = x W` (W a kernel of the decoder, e.g. `q` [embed, heads,
head_dim]) becomes `y = x W + (alpha / rank) * (x A) B` (Hu et al. 2021,
https://arxiv.org/abs/2106.09685; PEFT's `LoraLayer`): A [in..., rank] starts
uniform in +-1/sqrt(fan_in) (PEFT's kaiming_uniform(a=sqrt(5))), B [rank, out...]
at zero, so a fresh adapter leaves the model unchanged. Adapters are
`nnx.LoRAParam` variables next to their kernel (`q_lora_a`, `q_lora_b`); they
carry the kernel's logical axes, so the same sharding rules place them, and a
kernel stacked over layers (scanned layers: a leading `layers` axis) gets
adapters stacked the same way.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): with
`quantize_base` the frozen kernels of every attention/MLP projection are
quantized once, when the model is built, with qwix (`nf4`: NormalFloat4 in
blocks of 64 input features with one absmax scale each, as bitsandbytes;
`int8`: symmetric absmax per output channel) and dequantized on the fly in the
forward pass. Embeddings, norms and heads stay in the parameter dtype.

Why not qwix's `apply_lora_to_model`: it adds adapters by intercepting the
einsums of one traced method (`quantize_nnx_model` accepts exactly one) and
creating variables lazily on the module that issued them. Our trainers call
`hidden_states`/`head` and the sampler `decode`, and with scanned layers the
per-layer module inside `scan` is a transient slice on which new variables
cannot be created, so adapters could not be stacked. The adapter math is two
einsums; the quantization numerics (nf4 tables, tiled scales) are qwix's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from posttrain_jax.models.dense import contract, dense
from posttrain_jax.sharding import DEFAULT_RULES, Rules, logical_to_spec, normalize_rules

log = logging.getLogger(__name__)

# Projection name -> (number of contracting (input) axes, unstacked kernel ndim, PEFT module name).
PROJECTIONS = {
    "q": (1, 3, "self_attn.q_proj"), "k": (1, 3, "self_attn.k_proj"), "v": (1, 3, "self_attn.v_proj"),
    "o": (2, 3, "self_attn.o_proj"),
    "gate": (1, 2, "mlp.gate_proj"), "up": (1, 2, "mlp.up_proj"), "down": (1, 2, "mlp.down_proj"),
}
DEFAULT_TARGETS = r"(attn\.(q|k|v|o)|mlp\.(gate|up|down))$"
QUANTIZATIONS = ("none", "int8", "nf4")
NF4_BLOCK = 64  # bitsandbytes' default blocksize for 4-bit weights


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (scale alpha/r), targets (regex searched in paths like `layers.0.attn.q`, `blocks.3.attn.q`),
    dropout on the adapter input, quantize_base none | int8 | nf4."""

    rank: int = 16
    alpha: float = 32.0
    targets: str = DEFAULT_TARGETS
    dropout: float = 0.0
    quantize_base: str = "none"

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.quantize_base not in QUANTIZATIONS:
            raise ValueError(f"lora.quantize_base must be one of {QUANTIZATIONS}, got {self.quantize_base!r}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"lora.targets {self.targets!r} is not a valid regular expression: {e}") from e

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class QuantizedKernel(nnx.Variable):
    """A frozen, quantized projection kernel (qwix storage dtype); metadata `qtype` says how to read it."""


class QuantScale(nnx.Variable):
    """Scales of a `QuantizedKernel` (one per block / output channel)."""


def _projection_modules(model: nnx.Module):
    """(path string, module, projection names) for every module holding projection kernels."""
    from posttrain_jax.models.transformer import MLP, Attention
    for path, module in nnx.iter_modules(model):
        if isinstance(module, (Attention, MLP)):
            prefix = ".".join(str(p) for p in path)
            names = ("q", "k", "v", "o") if isinstance(module, Attention) else ("gate", "up", "down")
            yield prefix, module, names


def _value(var):
    return var.get_value() if hasattr(var, "get_value") else var.value


def _shard_like(mesh: Mesh | None, rules: Rules, axes, shape):
    if mesh is None:
        return None
    return NamedSharding(mesh, logical_to_spec(axes, normalize_rules(rules), mesh.axis_names))


def dense_kernel(module: nnx.Module, name: str) -> jax.Array:
    """The kernel `name` of `module` as a dense array (dequantized when the base is quantized)."""
    var = getattr(module, name)
    if isinstance(var, QuantizedKernel):
        scale = _value(getattr(module, name + "_scale"))
        return qwix.dequantize(qwix.QArray(qvalue=_value(var), scale=scale, qtype=var.get_metadata()["qtype"]))
    return var[...]


def project(module: nnx.Module, name: str, x: jax.Array, spec: str, dtype) -> jax.Array:
    """`einsum(spec, x, W)` plus the adapter's `scale * (x A) B` when `module` has one for `name`.

    x: [batch, length, in...] in the compute dtype; the kernel and adapters are cast to `dtype`.
    """
    y = dense(x, dense_kernel(module, name).astype(dtype), spec)
    lora_a = getattr(module, name + "_lora_a", None)
    if lora_a is None:
        return y
    a, b = lora_a[...].astype(dtype), getattr(module, name + "_lora_b")[...].astype(dtype)
    num_in = a.ndim - 1
    rng = getattr(module, "lora_dropout_key", None)
    if module.lora_dropout > 0 and rng is not None:
        # Inverted dropout on the adapter's input only, as PEFT (`lora_B(lora_A(dropout(x)))`).
        key = jax.random.fold_in(jax.random.wrap_key_data(rng[...]), zlib.crc32(name.encode()))
        keep = jax.random.bernoulli(key, 1.0 - module.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - module.lora_dropout), 0).astype(x.dtype)
    # The scale multiplies the rank-sized hidden, not the output: equal to PEFT's `B(A(x)) * scale`
    # (exactly so for alpha / rank a power of two), without a pass over [tokens, out] in each direction.
    hidden = contract(x, a, num_in) * module.lora_scale  # [..., rank]; a Python float keeps the dtype
    return y + contract(hidden, b, 1).astype(y.dtype)


def _quantize(w: jax.Array, qtype: str, num_in: int, lead: int):
    """qwix QArray of kernel w [lead..., in..., out...]: nf4 tiles the last input axis in blocks of 64."""
    in_axes = list(range(lead, lead + num_in))
    other = [i for i in range(w.ndim) if i not in in_axes]
    if qtype == "int8":  # one scale per output channel (per layer), absmax over the inputs
        return qwix.quantize(w, jnp.int8, channelwise_axes=other)
    block_axis = in_axes[-1]
    block = NF4_BLOCK if w.shape[block_axis] % NF4_BLOCK == 0 else w.shape[block_axis]
    return qwix.quantize(w, "nf4", channelwise_axes=other + in_axes[:-1], tiled_axes={block_axis: block})


def quantize_base(model: nnx.Module, qtype: str, *, mesh: Mesh | None = None,
                  rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Replace every attention/MLP kernel by a `QuantizedKernel` + `QuantScale` (in place; once, at load).

    The full-precision kernel is dropped as soon as its quantized form exists, so
    peak memory is the loaded model plus one quantized kernel.
    """
    if qtype == "none":
        return model
    for _, module, names in _projection_modules(model):
        for name in names:
            var = getattr(module, name)
            if isinstance(var, QuantizedKernel):
                raise ValueError(f"{name}: the base is already quantized")
            num_in, ndim, _ = PROJECTIONS[name]
            lead = var.ndim - ndim
            axes = tuple(var.get_metadata().get("logical_axes") or (None,) * var.ndim)
            abstract = jax.eval_shape(lambda w: _quantize(w, qtype, num_in, lead), var[...])
            scale_axes = tuple(a if s == full else None for a, s, full in zip(axes, abstract.scale.shape, var.shape))
            shardings = None
            if mesh is not None:
                shardings = (_shard_like(mesh, rules, axes, var.shape),
                             _shard_like(mesh, rules, scale_axes, abstract.scale.shape))

            @jax.jit(out_shardings=shardings)
            def run(w, num_in=num_in, lead=lead):
                q = _quantize(w, qtype, num_in, lead)
                return q.qvalue, q.scale

            qvalue, scale = run(var[...])
            setattr(module, name, QuantizedKernel(qvalue, logical_axes=axes, qtype=qtype))
            setattr(module, name + "_scale", QuantScale(scale, logical_axes=scale_axes))
    return model


def add_adapters(model: nnx.Module, cfg: LoraConfig, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                 seed: int = 0) -> list[str]:
    """Add zero-initialised-B adapters to every projection whose path matches `cfg.targets`; returns the paths.

    Raises ValueError when the pattern matches no projection (a typo would otherwise train nothing).
    """
    pattern = re.compile(cfg.targets)
    adapted = []
    for prefix, module, names in _projection_modules(model):
        module.lora_scale = cfg.scale
        module.lora_dropout = cfg.dropout
        for name in names:
            path = f"{prefix}.{name}"
            if not pattern.search(path):
                continue
            if hasattr(module, name + "_lora_a"):
                raise ValueError(f"{path} already has a LoRA adapter")
            var = getattr(module, name)
            num_in, ndim, _ = PROJECTIONS[name]
            lead = var.ndim - ndim
            shape, axes = var.shape, tuple(var.get_metadata().get("logical_axes") or (None,) * var.ndim)
            a_shape = shape[:lead + num_in] + (cfg.rank,)
            b_shape = shape[:lead] + (cfg.rank,) + shape[lead + num_in:]
            a_axes = axes[:lead + num_in] + (None,)
            b_axes = axes[:lead] + (None,) + axes[lead + num_in:]
            # Adapters train in the parameter dtype (the scales' dtype when the base is quantized).
            dtype = _value(getattr(module, name + "_scale")).dtype if isinstance(var, QuantizedKernel) else var.dtype
            bound = 1.0 / math.sqrt(math.prod(shape[lead:lead + num_in]))
            key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()))
            a_sharding = _shard_like(mesh, rules, a_axes, a_shape)
            b_sharding = _shard_like(mesh, rules, b_axes, b_shape)
            a = jax.jit(lambda k: jax.random.uniform(k, a_shape, jnp.float32, -bound, bound).astype(dtype),
                        out_shardings=a_sharding)(key)
            b = jax.jit(lambda: jnp.zeros(b_shape, dtype), out_shardings=b_sharding)()
            setattr(module, name + "_lora_a", nnx.LoRAParam(a, logical_axes=a_axes))
            setattr(module, name + "_lora_b", nnx.LoRAParam(b, logical_axes=b_axes))
            adapted.append(path)
    if not adapted:
        scanned = not hasattr(model, "blocks")
        raise ValueError(
            f"lora.targets {cfg.targets!r} matches no projection; paths look like "
            + ("'layers.0.attn.q' (a stack of scanned layers) or 'tail.0.mlp.down'; per-layer targets "
               "('blocks.<i>...') need model.scan_layers=False" if scanned
               else "'blocks.0.attn.q' or 'blocks.0.mlp.down'"))
    return adapted


def apply_lora(model: nnx.Module, cfg: LoraConfig, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
               seed: int = 0) -> nnx.Module:
    """Quantize the base (QLoRA) and add adapters, in place; returns the model."""
    quantize_base(model, cfg.quantize_base, mesh=mesh, rules=rules)
    paths = add_adapters(model, cfg, mesh=mesh, rules=rules, seed=seed)
    log.info("LoRA r=%d alpha=%g on %d projections (%s base)", cfg.rank, cfg.alpha, len(paths), cfg.quantize_base)
    return model


class DropoutKey(nnx.Variable):
    """Raw PRNG key data for LoRA dropout, set on a model merged inside a train step (never saved)."""


def set_dropout_keys(model: nnx.Module, key: jax.Array) -> None:
    """Give every adapted module with dropout its own key (one per layer when layers are stacked).

    key: a typed PRNG key. Without a key (evaluation, sampling, references) adapters run without dropout.
    """
    for prefix, module, names in _projection_modules(model):
        if module.__dict__.get("lora_dropout", 0.0) <= 0:
            continue
        adapted = [getattr(module, n + "_lora_a") for n in names if hasattr(module, n + "_lora_a")]
        if not adapted:
            continue
        name = next(n for n in names if hasattr(module, n + "_lora_a"))
        stacked = adapted[0].ndim - 1 - PROJECTIONS[name][0]
        module_key = jax.random.fold_in(key, zlib.crc32(prefix.encode()))
        if stacked:
            module_key = jax.random.split(module_key, adapted[0].shape[:stacked])
        module.lora_dropout_key = DropoutKey(jax.random.key_data(module_key))


def dropout_rate(model: nnx.Module) -> float:
    """The largest LoRA dropout rate of the model (0 without adapters or dropout)."""
    return max((module.__dict__.get("lora_dropout", 0.0) for _, module, _ in _projection_modules(model)),
               default=0.0)


def has_adapters(model: nnx.Module) -> bool:
    return bool(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))


def trainable_filter(head: str = "lm"):
    """What a LoRA run trains: the adapters, plus a reward model's scalar head."""
    return nnx.Any(nnx.LoRAParam, nnx.PathContains("score")) if head == "scalar" else nnx.LoRAParam


def base_graphdef(model: nnx.Module) -> nnx.GraphDef:
    """The graph of `model` with its adapters removed: merged with the frozen state it is the base model
    (the DPO reference, the GRPO KL reference) and shares every base array; nothing is copied."""
    view = nnx.merge(*nnx.split(model))  # a new module tree over the same arrays
    for _, module, names in _projection_modules(view):
        for name in names:
            for suffix in ("_lora_a", "_lora_b"):
                if hasattr(module, name + suffix):
                    delattr(module, name + suffix)
    return nnx.graphdef(view)


def _adapted_projections(model: nnx.Module):
    """(module path prefix, module, projection name, A, B) for every projection that has adapters;
    A and B are the adapter arrays as stored (stacked over scanned layer groups where scanned)."""
    for prefix, module, names in _projection_modules(model):
        for name in names:
            lora_a = getattr(module, name + "_lora_a", None)
            if lora_a is not None:
                yield prefix, module, name, lora_a[...], getattr(module, name + "_lora_b")[...]


def merged_kernels(model: nnx.Module) -> dict[str, jax.Array]:
    """Path -> dense W + scale * A B for every adapted projection (for a merged export), in W's dtype."""
    out = {}
    for prefix, module, name, lora_a, lora_b in _adapted_projections(model):
        w = dense_kernel(module, name)
        a, b = lora_a.astype(jnp.float32), lora_b.astype(jnp.float32)
        lead = a.ndim - 1 - PROJECTIONS[name][0]
        # Batched over the stacked (layer) axes: [L.., in.., r] x [L.., r, out..] -> [L.., in.., out..].
        flat_a = a.reshape(a.shape[:lead] + (-1, a.shape[-1]))
        flat_b = b.reshape(b.shape[:lead + 1] + (-1,))
        delta = jnp.matmul(flat_a, flat_b).reshape(w.shape)
        out[f"{prefix}.{name}"] = (w.astype(jnp.float32) + module.lora_scale * delta).astype(w.dtype)
    return out


def merge_adapters(model: nnx.Module) -> nnx.Module:
    """A plain model (no adapters, dense kernels) whose forward equals `model`'s: W <- W + scale * A B.

    A quantized base is dequantized first, so the result is the adapted QLoRA model in the
    parameter dtype (what transformers loads from a merged export).
    """
    kernels = merged_kernels(model)
    view = nnx.merge(*nnx.split(model))
    for prefix, module, names in _projection_modules(view):
        for name in names:
            var = getattr(module, name)
            path = f"{prefix}.{name}"
            if path in kernels:
                value = kernels[path]
            elif isinstance(var, QuantizedKernel):
                value = dense_kernel(module, name)
            else:
                continue
            axes = var.get_metadata().get("logical_axes")
            if isinstance(var, QuantizedKernel):
                delattr(module, name + "_scale")
            setattr(module, name, nnx.Param(value, logical_axes=axes))
            for suffix in ("_lora_a", "_lora_b"):
                if hasattr(module, name + suffix):
                    delattr(module, name + suffix)
    return view


def adapter_arrays(model: nnx.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`blocks.<layer>.<attn|mlp>.<name>` -> (A, B) as host float32 arrays, whatever the layout
    (stacked adapters of scanned layers are split into their layers). Collective across processes."""
    out = {}
    for prefix, _, name, lora_a, lora_b in _adapted_projections(model):
        a, b = _host(lora_a), _host(lora_b)
        group = prefix.rsplit(".", 1)[-1]  # attn | mlp
        if a.ndim - 1 - PROJECTIONS[name][0] == 0:
            out[f"blocks.{layer_index(model, prefix)}.{group}.{name}"] = (a, b)
        else:  # stacked over scanned layer groups: one entry per layer
            for g in range(a.shape[0]):
                out[f"blocks.{layer_index(model, prefix, g)}.{group}.{name}"] = (a[g], b[g])
    return out


def layer_index(model: nnx.Module, prefix: str, stacked: int | None = None) -> int:
    """The decoder layer of module path `prefix` (`blocks.<i>.attn`, or with scanned layers
    `layers.<j>.attn` at stack index `stacked`, `tail.<k>.attn`; see models/stacking.py)."""
    kind, index = prefix.split(".")[:2]
    index = int(index)
    if kind == "blocks":
        return index
    from posttrain_jax.models.stacking import layer_groups
    period, groups = layer_groups(model.config)
    if kind == "layers":
        return stacked * period + index
    if kind == "tail":
        return period * groups + index
    raise ValueError(f"{prefix}: not a decoder layer path")


def _host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process sharded) array on the host in float32; collective across processes."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float32)
    return np.asarray(jax.device_get(x), np.float32)
