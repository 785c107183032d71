"""Restore targets and the checks that turn a wrong target into one clear message.

Orbax names every leaf of a saved tree by its dotted key path
(`params.blocks.0.attn.q.value`); the checks here use the same names, so an
error points at the exact entry of the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

STATE, METADATA, DATA_STATE = "state", "metadata", "data_state"


@dataclasses.dataclass(frozen=True)
class StoredLeaf:
    """What a checkpoint records about one leaf: its name, stored shape and dtype."""

    name: str
    path: tuple[str, ...]  # keys from the root of the saved tree
    shape: tuple[int, ...] | None
    dtype: Any


def as_path(directory) -> epath.Path:
    """An absolute epath (Orbax wants absolute paths; `gs://` URLs pass through)."""
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def resolve_step_dir(path, step: int | None = None) -> epath.Path:
    """The directory of one complete checkpoint.

    `path` is either a run directory (holding step directories; `step=None` picks
    the latest complete one) or one step directory. Interrupted saves (Orbax's
    `<step>.orbax-checkpoint-tmp*` directories) are never returned.
    """
    path = as_path(path)
    if (path / STATE).exists() or (path / "_CHECKPOINT_METADATA").exists() or ".orbax-checkpoint-tmp" in path.name:
        if not ocp.path.step.is_path_finalized(path):
            raise FileNotFoundError(f"{path} is an incomplete checkpoint (its save was interrupted); "
                                    f"use a complete step directory or the run directory")
        if step is not None and path.name != str(step):
            raise ValueError(f"{path} is the checkpoint of one step; pass its run directory to choose step {step}")
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    steps = {ocp.path.step.step_from_checkpoint_name(p.name): p for p in ocp.path.step.checkpoint_steps_paths(path)}
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {path} (interrupted saves are ignored)")
    if step is None:
        return steps[max(steps)]
    if int(step) not in steps:
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {path}; complete steps: {sorted(steps)}")
    return steps[int(step)]


def stored_leaves(state_dir: epath.Path) -> dict[str, StoredLeaf]:
    """Name -> StoredLeaf for every leaf of the state saved in `state_dir`, in tree order."""
    tree = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, ocp.metadata.value.Metadata))[0]
    out = {}
    for keys, leaf in flat:
        path = tuple(_key_name(k) for k in keys)
        shape = getattr(leaf, "shape", None)
        out[leaf.name] = StoredLeaf(leaf.name, path, None if shape is None else tuple(shape),
                                    getattr(leaf, "dtype", None))
    return out


def _key_name(key) -> str:
    """One step of a key path, spelt as Orbax spells it in leaf names."""
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def named_leaves(tree) -> dict[str, Any]:
    """Name (as Orbax writes it) -> leaf, for every leaf of `tree`, in tree order."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in keys): leaf for keys, leaf in flat}


def is_prng_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _stored_shape(leaf) -> tuple[int, ...]:
    """Typed PRNG keys are stored as their raw key data, which has trailing dims."""
    if is_prng_key(leaf):
        return tuple(jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)).shape)
    return tuple(leaf.shape)


def check_target(target, stored: dict[str, StoredLeaf], where: str, *, partial: bool) -> None:
    """Raise one clear error for the first leaf where `target` and the checkpoint disagree.

    Checked: every target leaf is in the checkpoint with the same shape and has a
    sharding that splits that shape; unless `partial`, every checkpoint leaf is
    in the target. Dtypes may differ (Orbax casts on restore).
    """
    wanted = named_leaves(target)
    top = sorted({name.split(".")[0] for name in stored})
    for name, leaf in wanted.items():
        if name not in stored:
            raise ValueError(f"{where}: the restore target has '{name}' but the checkpoint does not "
                             f"(the checkpoint's top-level entries are {top}; a checkpoint written by "
                             f"average_checkpoints holds params only: load it with load_params)")
        if not hasattr(leaf, "shape"):
            continue  # Python scalars restore as saved
        have = stored[name].shape
        if have is not None and tuple(have) != _stored_shape(leaf):
            raise ValueError(f"{where}: '{name}' has shape {tuple(have)} in the checkpoint but {tuple(leaf.shape)} "
                             f"in the restore target; is the checkpoint from another model config?")
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            raise ValueError(f"{where}: restore target leaf '{name}' has no sharding; build the target with "
                             f"abstract_target(...) so every array lands on the mesh")
        try:
            sharding.shard_shape(tuple(leaf.shape))
        except Exception as err:  # jax raises several types for indivisible or unknown axes
            raise ValueError(f"{where}: restore target leaf '{name}' of shape {tuple(leaf.shape)} cannot be "
                             f"sharded as {sharding}: {err}") from None
    if not partial:
        extra = [name for name in stored if name not in wanted]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise ValueError(f"{where}: the checkpoint has '{extra[0]}'{more} which the restore target lacks; "
                             f"pass partial=True to restore only the target's leaves")


def abstract_target(tree, shardings=None):
    """A restore target: the tree with every array replaced by a ShapeDtypeStruct carrying a sharding.

    `tree` may hold live jax.Arrays (a running state), ShapeDtypeStructs (from
    `jax.eval_shape`, with or without shardings) or numpy arrays. `shardings` is:

    - None: keep each leaf's own sharding (an error names any leaf without one);
    - a Mesh: move every leaf onto this mesh, keeping the PartitionSpec of leaves
      that have a NamedSharding and replicating the rest (scalars, single-device
      arrays). This is how a run comes back on another mesh shape;
    - a pytree of Shardings with the same structure as `tree` (e.g. a TrainState
      of shardings, or `model_shardings(config, mesh)` for an nnx.State of params).

    Python scalars and other non-array leaves are kept as they are.
    """
    def is_array(leaf) -> bool:
        return hasattr(leaf, "shape") and hasattr(leaf, "dtype")

    if shardings is not None and not isinstance(shardings, Mesh):
        try:
            return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
                                if is_array(leaf) else leaf, tree, shardings)
        except ValueError as err:
            raise ValueError(f"abstract_target: the shardings tree does not match the state tree: {err}") from None

    mesh = shardings
    names = named_leaves(tree)
    resolved = []
    for name, leaf in names.items():
        if not is_array(leaf):
            resolved.append(leaf)
            continue
        sharding = getattr(leaf, "sharding", None)
        if mesh is not None:
            spec = sharding.spec if isinstance(sharding, NamedSharding) else P()
            missing = [axis for entry in spec if entry is not None
                       for axis in ((entry,) if isinstance(entry, str) else entry) if axis not in mesh.axis_names]
            if missing:
                raise ValueError(f"abstract_target: '{name}' is sharded over mesh axes {missing} that the new mesh "
                                 f"{dict(mesh.shape)} does not have; pass a shardings tree instead of a mesh")
            sharding = NamedSharding(mesh, spec)
        elif sharding is None:
            raise ValueError(f"abstract_target: '{name}' has no sharding; pass shardings= (a mesh or a tree)")
        resolved.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))
    return jax.tree.unflatten(jax.tree.structure(tree), resolved)


def restore_args_for(target):
    """Orbax restore args: arrays into their target shardings, PRNG keys as keys."""
    return ocp.checkpoint_utils.construct_restore_args(target)


def nested(leaves: dict[tuple[str, ...], Any]) -> dict:
    """{("a", "b"): x} -> {"a": {"b": x}}: the partial-restore item for a few stored leaves."""
    root: dict = {}
    for path, value in leaves.items():
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return root


def host_target(leaves: list[StoredLeaf]):
    """Target and restore args that read `leaves` as host numpy arrays, as nested dicts."""
    target = nested({leaf.path: jax.ShapeDtypeStruct(leaf.shape, np.dtype(leaf.dtype)) for leaf in leaves})
    args = nested({leaf.path: ocp.RestoreArgs(restore_type=np.ndarray) for leaf in leaves})
    return target, args


def get_path(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree
