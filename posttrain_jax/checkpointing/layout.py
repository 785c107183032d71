"""Restoring checkpoints written before layers were scanned (one `blocks.<i>` entry per layer).

A run saved by the unscanned model names layer i's leaves `...blocks.<i>.X`
(params, optimizer moments, EMA alike); the scanned model wants `...layers.<j>.X`
with a leading layers axis (see `posttrain_jax.models.stacking`). When a restore
target is scanned and the checkpoint holds the per-layer leaves instead, each
layer is read into the sharding of one slice of its stack and the slices are
stacked on device: the run continues as if it had been saved scanned.
"""

from __future__ import annotations


import jax
from flax import nnx

from posttrain_jax.checkpointing.trees import StoredLeaf, named_leaves
from posttrain_jax.models.stacking import layer_sharding, stack_program, unstacked_sources


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


def _is_scanned(node) -> bool:
    return isinstance(node, nnx.State) and "layers" in node


def _groups(node) -> tuple[int, int]:
    """(period, groups) of a scanned model's State node."""
    period = len(node["layers"])
    return period, jax.tree.leaves(node["layers"][0])[0].shape[0]


def per_layer_target(target):
    """`target` with every scanned model State (`layers`, `tail`) replaced by the per-layer `blocks` layout."""

    def unstack(node):
        if not _is_scanned(node):
            return node
        period, groups = _groups(node)
        blocks = {}
        for j in range(period):
            for g in range(groups):
                blocks[g * period + j] = jax.tree.map(
                    lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype,
                                                      sharding=layer_sharding(leaf.sharding)), node["layers"][j])
        for k in range(len(node["tail"]) if "tail" in node else 0):
            blocks[period * groups + k] = node["tail"][k]
        rest = {key: value for key, value in node.items() if key not in ("layers", "tail")}
        return nnx.State({**rest, "blocks": nnx.State(dict(sorted(blocks.items())))})

    return jax.tree.map(unstack, target, is_leaf=_is_scanned)


def to_scanned(target, restored):
    """The per-layer `restored` tree in `target`'s scanned layout, each stack in its target sharding."""

    def stack(node, old):
        if not _is_scanned(node):
            return old
        period, groups = _groups(node)
        layers = {}
        for j in range(period):
            per_layer = [old["blocks"][g * period + j] for g in range(groups)]
            layers[j] = jax.tree.map(lambda leaf, *values: stack_program(leaf.sharding)(*values),
                                     node["layers"][j], *per_layer)
        out = {key: value for key, value in old.items() if key != "blocks"}
        out["layers"] = nnx.State(layers)
        if "tail" in node:
            out["tail"] = nnx.State({k: old["blocks"][period * groups + k] for k in range(len(node["tail"]))})
        return nnx.State(out)

    return jax.tree.map(stack, target, restored, is_leaf=_is_scanned)
