"""Restoring checkpoints written before layers were scanned (one `blocks.<i>` entry per layer).

A run saved by the unscanned model names layer i's leaves `...blocks.<i>.X`
(params, optimizer moments, EMA alike); the scanned model wants `...layers.<j>.X`
with a leading layers axis (see `posttrain_jax.models.stacking`). When a restore
target is scanned and the checkpoint holds the per-layer leaves instead, each
layer is read into the sharding of one slice of its stack and the slices are
stacked on device: the run continues as if it had been saved scanned.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from posttrain_jax.checkpointing.trees import StoredLeaf, get_path, named_leaves, nested, restore_args_for
from posttrain_jax.models.stacking import unstacked_sources


def per_layer_plan(target, stored: dict[str, StoredLeaf]) -> dict[str, list[str]]:
    """Target leaf name -> the checkpoint's per-layer leaf names it is stacked from (empty: nothing to do).

    Only leaves the checkpoint lacks are planned, and only when every one of
    their per-layer sources is in the checkpoint.
    """
    wanted = named_leaves(target)
    sources = unstacked_sources({name: tuple(getattr(leaf, "shape", ()) or ()) for name, leaf in wanted.items()})
    return {name: names for name, names in sources.items()
            if name not in stored and names and all(source in stored for source in names)}


def scanned_but_target_is_not(target, stored: dict[str, StoredLeaf]) -> str | None:
    """A message when the checkpoint is scanned but the target has per-layer leaves (the other way round)."""
    wanted = named_leaves(target)
    if any(".blocks." in f".{name}" for name in wanted) and any(".layers." in f".{name}" for name in stored):
        return ("the checkpoint has scanned layers ('...layers.<j>...' with a leading layers axis) but the restore "
                "target has one entry per layer ('...blocks.<i>...'); restore it with model.scan_layers=True "
                "(the default)")
    return None


def _slice_sharding(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
    return sharding


@functools.cache
def _stack_program(sharding):
    return jax.jit(lambda *layers: jnp.stack(layers), out_shardings=sharding)


def per_layer_item(target, stored: dict[str, StoredLeaf], plan: dict[str, list[str]], where: str):
    """The (nested-dict) Orbax restore item and args that read the target's leaves, per layer where planned."""
    leaves = {}
    for name, leaf in named_leaves(target).items():
        if name not in plan:
            if name not in stored:
                raise ValueError(f"{where}: the restore target has '{name}' but the checkpoint does not")
            leaves[stored[name].path] = leaf
            continue
        layer_shape = tuple(leaf.shape[1:])
        for source in plan[name]:
            if stored[source].shape is not None and tuple(stored[source].shape) != layer_shape:
                raise ValueError(f"{where}: '{source}' has shape {tuple(stored[source].shape)} in the checkpoint "
                                 f"but one layer of '{name}' is {layer_shape}; is the checkpoint from another "
                                 f"model config?")
            leaves[stored[source].path] = jax.ShapeDtypeStruct(layer_shape, leaf.dtype,
                                                               sharding=_slice_sharding(leaf.sharding))
    item = nested(leaves)
    return item, restore_args_for(item)


def assemble(target, restored, stored: dict[str, StoredLeaf], plan: dict[str, list[str]]):
    """The restored nested dicts rearranged into `target`'s tree, per-layer leaves stacked into its shardings."""
    values = []
    for name, leaf in named_leaves(target).items():
        if name not in plan:
            values.append(get_path(restored, stored[name].path))
            continue
        layers = [get_path(restored, stored[source].path) for source in plan[name]]
        values.append(_stack_program(leaf.sharding)(*layers))
    return jax.tree.unflatten(jax.tree.structure(target), values)


def restore_per_layer(state_dir, target, stored: dict[str, StoredLeaf], plan: dict[str, list[str]], where: str):
    """Read a per-layer (unscanned) checkpoint's state directory into the scanned `target`."""
    item, restore_args = per_layer_item(target, stored, plan, where)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    return assemble(target, restored, stored, plan)
