"""How layers are laid out when they are scanned, and the map between the two layouts.

With `ModelConfig.scan_layers` the decoder's layers are run as a `lax.scan` over
*groups*: the smallest period `p` of `layer_types` (1 for Llama / Qwen, 6 for
Gemma 3's five sliding layers and one global layer) gives `G = num_layers // p`
groups of `p` blocks. Parameter `REST` of layer `i = g * p + j` (g < G) lives at

    layers.<j>.REST[g]     (every leaf of `layers.<j>` has a leading "layers" axis of size G)

and the `num_layers - G * p` remaining layers (e.g. 2 of Gemma 3 1B's 26) are
unrolled, one module each, at `tail.<k>.REST` for layer `G * p + k`. Without
scanning, layer `i` lives at `blocks.<i>.REST`: the layout of checkpoints written
before layers were scanned, and the oracle the scanned model is tested against.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from posttrain_jax.models.config import ModelConfig

LAYERS_AXIS = "layers"  # logical name of the stacking axis (never sharded: see sharding.DEFAULT_RULES)


def layer_period(layer_types: tuple[str, ...]) -> int:
    """The smallest p such that layer i has the type of layer i % p (p = len for no repetition)."""
    n = len(layer_types)
    for p in range(1, n + 1):
        if all(layer_types[i] == layer_types[i % p] for i in range(n)):
            return p
    return max(n, 1)


def layer_groups(config: ModelConfig) -> tuple[int, int]:
    """(period, groups): layers [0, period * groups) are scanned, the rest are the unrolled tail."""
    period = layer_period(config.layer_types)
    return period, config.num_layers // period


def scanned_location(config: ModelConfig, layer: int) -> tuple[str, int | None]:
    """Where layer `layer` lives in the scanned layout: ("layers.<j>", g) or ("tail.<k>", None)."""
    period, groups = layer_groups(config)
    if layer < period * groups:
        return f"layers.{layer % period}", layer // period
    return f"tail.{layer - period * groups}", None


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """One module of the same structure whose every Variable stacks the modules' values on a new axis 0.

    The modules must have identical graph definitions (same layer type); the
    logical axes gain the leading `LAYERS_AXIS`.
    """
    splits = [nnx.split(m) for m in modules]
    graphdef = splits[0][0]
    if any(other != graphdef for other, _ in splits[1:]):
        raise ValueError(f"cannot stack {type(modules[0]).__name__} modules of different structure")
    states = [state for _, state in splits]

    def stack(*variables):
        axes = variables[0].get_metadata().get("logical_axes") or (None,) * len(variables[0].shape)
        value = jnp.stack([v.get_value() for v in variables])
        return variables[0].replace(value, logical_axes=(LAYERS_AXIS,) + tuple(axes))

    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


@jax.custom_vjp
def unstack(x: jax.Array) -> tuple[jax.Array, ...]:
    """x [n, ...] -> its n slices x[0], ..., x[n - 1]; the gradient is one `jnp.stack` of theirs.

    Autodiff of n separate slices would pad each slice's gradient to the full stack and add
    the n padded arrays; this writes each layer's gradient once.
    """
    return tuple(x[i] for i in range(x.shape[0]))


def _unstack_fwd(x):
    return unstack(x), None


def _unstack_bwd(_, cotangents):
    return (jnp.stack(cotangents),)


unstack.defvjp(_unstack_fwd, _unstack_bwd)


def layer_sharding(sharding):
    """The sharding of one layer of a stacked array (its leading layers axis is never sharded)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
    return sharding


@functools.cache
def stack_program(sharding):
    """A jitted `jnp.stack` of per-layer arrays straight into the stack's sharding (one per sharding)."""
    return jax.jit(lambda *layers: jnp.stack(layers), out_shardings=sharding)


# ------------------------------------------------------------- names of checkpoint leaves

_STACKED = re.compile(r"^((?:.*\.)?)(layers|tail)\.(\d+)\.(.+)$")


def unstacked_sources(names_shapes: dict[str, tuple[int, ...] | None]) -> dict[str, list[str]]:
    """For the leaves of a scanned-layout tree, the per-layer (`blocks.<i>`) names they are made of.

    `names_shapes` maps dotted leaf names (as Orbax writes them, e.g.
    `params.layers.0.attn.q.value` or `opt_state.0.mu.tail.1.mlp.up.value`) to
    shapes. Returns name -> list of unscanned names: G of them (in stacking order)
    for a `layers.<j>` leaf, one for a `tail.<k>` leaf; other leaves are absent.
    Periods and group counts are read per prefix from the names and leading dims.
    """
    layers: dict[str, tuple[int, int]] = {}  # prefix -> (period, groups)
    parsed = {}
    for name, shape in names_shapes.items():
        match = _STACKED.match(name)
        if not match:
            continue
        prefix, kind, index, rest = match.group(1), match.group(2), int(match.group(3)), match.group(4)
        parsed[name] = (prefix, kind, index, rest)
        if kind == "layers" and shape:
            period, groups = layers.get(prefix, (0, shape[0]))
            layers[prefix] = (max(period, index + 1), groups)
    out = {}
    for name, (prefix, kind, index, rest) in parsed.items():
        period, groups = layers.get(prefix, (0, 0))
        if kind == "layers":
            out[name] = [f"{prefix}blocks.{g * period + index}.{rest}" for g in range(groups)]
        else:
            out[name] = [f"{prefix}blocks.{period * groups + index}.{rest}"]
    return out
