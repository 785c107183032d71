"""Model averaging across checkpoints (Llama 3, section 4.1.5) and an EMA of params."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from posttrain_jax.checkpointing.manager import RunCheckpointer, read_metadata
from posttrain_jax.checkpointing.trees import (STATE, StoredLeaf, check_target, get_path, host_target, named_leaves,
                                               nested, resolve_step_dir, restore_args_for, stored_leaves)

log = logging.getLogger(__name__)

# Where the run metadata keeps the model config (a dict); checkpoints to average must agree on it.
MODEL_CONFIG_KEY = "model_config"


def ema_update(ema_params, params, decay):
    """One EMA step: `decay * ema + (1 - decay) * params`, leaf by leaf.

    Pure and jit-friendly (`decay` may be a traced scalar, e.g. from a warm-up
    schedule). The arithmetic is float32; each result keeps the dtype of its EMA
    leaf. Non-float leaves (counters) take the value from `params`.
    """
    decay = jnp.asarray(decay, jnp.float32)

    def one(ema, param):
        if not jnp.issubdtype(ema.dtype, jnp.floating):
            return param
        mixed = decay * ema.astype(jnp.float32) + (1.0 - decay) * param.astype(jnp.float32)
        return mixed.astype(ema.dtype)

    return jax.tree.map(one, ema_params, params)


def _normalised_weights(weights, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} checkpoints; give one weight per checkpoint")
    bad = [(i, w) for i, w in enumerate(weights) if not np.isfinite(w) or w <= 0]
    if bad:
        raise ValueError(f"averaging weights must be positive and finite; weight {bad[0][0]} is {bad[0][1]}")
    total = sum(weights)
    return [w / total for w in weights]


def _first_difference(a, b, path: str = "") -> str | None:
    """Where two JSON values first differ, as a readable key path."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                return f"'{where}' is only in the {'first' if key in a else 'second'}"
            found = _first_difference(a[key], b[key], where)
            if found:
                return found
        return None
    if a != b:
        return f"'{path or MODEL_CONFIG_KEY}' is {a!r} in the first but {b!r} in the second"
    return None


def _check_same_model(sources: list[epath.Path], metas: list[dict | None]) -> None:
    configs = [(meta or {}).get(MODEL_CONFIG_KEY) for meta in metas]
    if all(config is None for config in configs):
        log.warning("no '%s' in the metadata of the checkpoints to average; comparing only their trees",
                    MODEL_CONFIG_KEY)
        return
    for source, config in zip(sources[1:], configs[1:]):
        if config is None or configs[0] is None:
            missing = source if config is None else sources[0]
            raise ValueError(f"cannot average {sources[0]} with {source}: {missing} has no '{MODEL_CONFIG_KEY}' "
                             f"in its metadata, so it may be another model")
        difference = _first_difference(configs[0], config)
        if difference:
            raise ValueError(f"cannot average checkpoints of different models: {sources[0]} (first) and "
                             f"{source} (second) differ in {MODEL_CONFIG_KEY}: {difference}")
    # Adapter checkpoints (LoRA runs) average their A and B factors leaf by leaf: only meaningful for
    # adapters of one base with the same LoRA config, which is what is checked here.
    loras = [(meta or {}).get("lora") for meta in metas]
    for source, lora in zip(sources[1:], loras[1:]):
        difference = _first_difference(loras[0], lora) if loras[0] is not None and lora is not None else (
            None if loras[0] is None and lora is None else "one is a LoRA (adapter) checkpoint, the other is not")
        if difference:
            raise ValueError(f"cannot average {sources[0]} with {source}: their LoRA adapters differ "
                             f"(base or config): {difference}")


def _check_same_tree(sources: list[epath.Path], trees: list[dict[str, StoredLeaf]]) -> None:
    first = trees[0]
    for source, tree in zip(sources[1:], trees[1:]):
        for name, leaf in first.items():
            if name not in tree:
                raise ValueError(f"cannot average: '{name}' is in {sources[0]} but not in {source}")
            if tree[name].shape != leaf.shape:
                raise ValueError(f"cannot average: '{name}' has shape {leaf.shape} in {sources[0]} but "
                                 f"{tree[name].shape} in {source}")
            if np.dtype(tree[name].dtype) != np.dtype(leaf.dtype):
                log.warning("'%s' is %s in %s but %s in %s; the average is stored as %s", name, leaf.dtype,
                            sources[0], tree[name].dtype, source, leaf.dtype)
        extra = [name for name in tree if name not in first]
        if extra:
            raise ValueError(f"cannot average: '{extra[0]}' is in {source} but not in {sources[0]}")


def _read_leaf(checkpointer: ocp.Checkpointer, step_dir: epath.Path, leaf: StoredLeaf, sharding):
    """One leaf of one checkpoint (Orbax's partial restore reads nothing else)."""
    if sharding is None:
        item, restore_args = host_target([leaf])
    else:
        item = nested({leaf.path: jax.ShapeDtypeStruct(leaf.shape, np.dtype(leaf.dtype), sharding=sharding)})
        restore_args = restore_args_for(item)
    restored = checkpointer.restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    return get_path(restored, leaf.path)


def average_checkpoints(checkpoints: Sequence, out_dir, *, weights: Sequence[float] | None = None, target=None,
                        params_key: str = "params", step: int | None = None) -> epath.Path:
    """Write the weighted mean of the params of several checkpoints of one model as a new checkpoint.

    `checkpoints` are run directories (latest complete step), step directories,
    or `(run_directory, step)` pairs. `weights` (default: equal) must be
    positive; they are normalised to sum to one. Checkpoints must agree on the
    model config in their metadata (`MODEL_CONFIG_KEY`) and on every params
    leaf's name and shape; the first disagreement is reported.

    Leaves are read one at a time from each checkpoint and summed in float32, so
    memory stays near one model (the average) plus one float32 leaf. The average
    is stored in each leaf's original dtype. With `target` (abstract params with
    shardings, as for `load_params`) each leaf is read and summed sharded on the
    mesh; without, on the host in numpy (on a multi-host run every process then
    holds the whole average: pass a target there). All processes call it together.

    The output, `<out_dir>/<step>` (step default: the largest input step), holds
    `{"params": average}` plus the first checkpoint's metadata with an
    `averaged_from` list; it has no optimizer state or data-iterator state, so
    it starts a new run or an export rather than resuming one. Read it with
    `load_params(out_dir)`. `params_key="ema_params"` averages EMA weights.
    """
    if not checkpoints:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    sources = [resolve_step_dir(*c) if isinstance(c, tuple | list) else resolve_step_dir(c) for c in checkpoints]
    weights = _normalised_weights(weights, len(sources))
    metas = [read_metadata(source) for source in sources]
    _check_same_model(sources, metas)
    trees = []
    for source in sources:
        leaves = {name: leaf for name, leaf in stored_leaves(source / STATE).items() if leaf.path[0] == params_key}
        if not leaves:
            raise ValueError(f"checkpoint {source} has no '{params_key}' entry in its state")
        trees.append(leaves)
    _check_same_tree(sources, trees)
    shardings = {}
    if target is not None:
        check_target({params_key: target}, trees[0], f"checkpoint {sources[0]}", partial=False)
        shardings = {name: leaf.sharding for name, leaf in named_leaves({params_key: target}).items()}

    averaged = {}
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        for name, leaf in trees[0].items():
            total = None
            for source, weight in zip(sources, weights):
                value = _read_leaf(checkpointer, source, leaf, shardings.get(name))
                if isinstance(value, jax.Array):
                    term = jnp.float32(weight) * value.astype(jnp.float32)
                else:
                    term = np.float32(weight) * np.asarray(value, np.float32)
                total = term if total is None else total + term
                del value, term
            averaged[("params",) + leaf.path[1:]] = total.astype(np.dtype(leaf.dtype))

    metadata = dict(metas[0] or {})
    metadata["averaged_from"] = [{"checkpoint": str(source), "weight": weight}
                                 for source, weight in zip(sources, weights)]
    metadata["averaged_params_key"] = params_key
    out_step = int(step) if step is not None else max(int(source.name) for source in sources)
    with RunCheckpointer(out_dir, keep=None, async_save=False) as out:
        existing = out.all_steps()
        if existing:
            raise ValueError(f"{out.directory} already holds checkpoints (steps {existing}); "
                             f"write the average to a new directory")
        out.save(out_step, nested(averaged), metadata=metadata, force=True)
    log.info("averaged %d checkpoints into %s (step %d)", len(sources), out.directory, out_step)
    return out.directory / str(out_step)
