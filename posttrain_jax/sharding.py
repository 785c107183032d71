"""Logical axis names -> mesh shardings.

Models and batches name their axes logically (`embed`, `mlp`, `heads`, `batch`,
...). A rule table from config maps each name to mesh axes; the first rule
naming an axis wins, and a mesh axis is never used twice in one spec (a later
dimension that would reuse it stays unsharded, as in MaxText).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# FSDP over `fsdp` (weights' embed dim), tensor parallelism over `tensor`
# (heads, MLP, vocab), batch over every data-parallel axis.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("length", None),
    ("act_embed", None),
    ("cache_length", None),
    # The stacking axis of scanned layers: every device holds its shard of every layer.
    ("layers", None),
)

_ACTIVE_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("logical_rules", default=None)


def normalize_rules(rules) -> Rules:
    """Rules from config (lists, ConfigDict tuples) as a tuple of (name, axes)."""
    out = []
    for item in rules:
        if len(item) != 2:
            raise ValueError(f"a sharding rule is (logical_name, mesh_axes), got {item!r}")
        name, axes = item
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((str(name), axes))
    return tuple(out)


@contextlib.contextmanager
def logical_rules(rules: Rules):
    """Make `rules` the ones `constrain` uses while tracing inside this block."""
    token = _ACTIVE_RULES.set(normalize_rules(rules))
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def active_rules() -> Rules | None:
    """The rules set by the innermost `logical_rules` block, or None outside one."""
    return _ACTIVE_RULES.get()


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh_axis_names=None) -> P:
    """PartitionSpec for an array whose dimensions carry `names`."""
    lookup: dict[str, MeshAxes] = {}
    for name, axes in rules:
        lookup.setdefault(name, axes)
    used: set[str] = set()
    spec = []
    for name in names:
        axes = lookup.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if mesh_axis_names is not None:
            axes = tuple(a for a in axes if a in mesh_axis_names)
        if any(a in used for a in axes):
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op without a mesh and rules."""
    rules = _ACTIVE_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, mesh.axis_names))


def _axes_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    entries = (entry,) if isinstance(entry, str) else entry
    return int(np.prod([mesh.shape[a] for a in entries]))


def check_divisible(path: str, shape, names, spec: P, mesh: Mesh) -> None:
    """Fail with what to change when a dimension does not split evenly over its mesh axes."""
    for dim, (size, name, entry) in enumerate(zip(shape, names, tuple(spec) + (None,) * len(shape))):
        parts = _axes_size(mesh, entry)
        if size % parts:
            raise ValueError(
                f"{path}: dimension {dim} ('{name}', size {size}) cannot be split over mesh axes {entry} "
                f"of total size {parts} (mesh {dict(mesh.shape)}). Choose mesh sizes that divide {size}, "
                f"or map '{name}' to other axes or None in the sharding rules.")


def state_shardings(abstract_state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for an NNX state, from each Variable's `logical_axes` metadata.

    Returns a state of the same structure whose Variables hold NamedShardings,
    usable as `out_shardings` of a jitted init or as restore targets.
    """
    rules = normalize_rules(rules)

    def one(path, var):
        names = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        if len(names) != len(var.shape):
            raise ValueError(f"{_path_str(path)}: logical_axes {names} do not match shape {var.shape}")
        spec = logical_to_spec(names, rules, mesh.axis_names)
        check_divisible(_path_str(path), var.shape, names, spec, mesh)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _path_str(path) -> str:
    parts = []
    for key in path:
        parts.append(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))))
    return ".".join(parts)


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] array: batch over the data-parallel axes, the rest replicated."""
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), normalize_rules(rules), mesh.axis_names)
    return NamedSharding(mesh, spec)


def data_shards(mesh: Mesh) -> int:
    """How many ways a global batch is split: the data-parallel (`data` x `fsdp`) positions of `mesh`."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict[str, jax.Array]:
    """Host-local numpy arrays -> global jax.Arrays split over the batch axes.

    Each process passes only its own rows (its share of the global batch); on one
    host that is the whole batch. Works unchanged on multi-host meshes.
    """
    out = {}
    for key, local in batch.items():
        local = np.asarray(local)
        sharding = batch_sharding(mesh, rules, local.ndim)
        per_process = jax.process_count()
        global_rows = local.shape[0] * per_process
        parts = _axes_size(mesh, sharding.spec[0]) if local.ndim else 1
        if local.ndim and global_rows % parts:
            raise ValueError(f"batch key '{key}': global batch {global_rows} rows is not divisible by the "
                             f"{parts} data-parallel shards of mesh {dict(mesh.shape)}")
        out[key] = jax.make_array_from_process_local_data(sharding, local)
    return out
