"""Save and restore the whole run: state pytree, per-process data-iterator state, metadata.

A run directory holds one directory per step, each with three Orbax items:

    <dir>/<step>/state/        the TrainState pytree (params, opt_state, step, rng, ...)
    <dir>/<step>/data_state/   process_<i>-of-<n>.json, one per process
    <dir>/<step>/metadata/     JSON: config, model config, tokenizer path, ...

Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to
`<step>` only once every process has finished (on GCS, where renames are not
atomic, a `commit_success.txt` marks completion instead). A process killed
mid-save therefore leaves an unfinished temporary directory, which step listing
ignores and the next `RunCheckpointer` on the directory deletes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from posttrain_jax.checkpointing.layout import (per_layer_plan, per_layer_target, scanned_but_target_is_not,
                                                to_scanned)
from posttrain_jax.checkpointing.trees import (DATA_STATE, METADATA, STATE, as_path, check_target, host_target,
                                               resolve_step_dir, restore_args_for, stored_leaves)

log = logging.getLogger(__name__)


def _process_file(index: int, count: int) -> str:
    return f"process_{index}-of-{count}.json"


class DataStateHandler(ocp.AsyncCheckpointHandler):
    """Every process writes its own JSON data-iterator state (Orbax's JsonSave writes on process 0 only)."""

    async def async_save(self, directory: epath.Path, args: DataStateSave):
        # Serialise now: the caller may mutate its dict while the write runs in the background.
        text = json.dumps(args.state)
        path = directory / _process_file(jax.process_index(), jax.process_count())

        async def write():
            path.write_text(text)

        # Waits for Orbax's signal that the (possibly asynchronously created) item directory exists.
        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="data_state_save")]

    def save(self, directory: epath.Path, args: DataStateSave):
        (directory / _process_file(jax.process_index(), jax.process_count())).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None):
        index, count = jax.process_index(), jax.process_count()
        path = directory / _process_file(index, count)
        if not path.exists():
            found = sorted(p.name for p in directory.glob("process_*.json"))
            # Saved by another number of processes: fine when all of them saved the same state (the
            # data pipelines' state is a batch position, the same on every host, whatever their number).
            complete = bool(found) and sorted(found) == sorted(_process_file(i, len(found)) for i in range(len(found)))
            if complete and len({(directory / name).read_text() for name in found}) == 1:
                return json.loads((directory / found[0]).read_text())
            raise ValueError(f"{directory}: no data-iterator state for process {index} of {count} (found {found}); "
                             f"the run was saved with another number of processes. Restore with "
                             f"restore_data_state=False to restart the data iterator from its beginning")
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path):
        return None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def _first_unserialisable(obj, path: str = "") -> str | None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str | int | float | bool) and key is not None:
                return f"{path}[{key!r}] (a {type(key).__name__} key)"
            found = _first_unserialisable(value, f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            found = _first_unserialisable(value, f"{path}[{i}]")
            if found:
                return found
        return None
    try:
        json.dumps(obj)
    except (TypeError, ValueError):
        return f"{path} (a {type(obj).__name__})"
    return None


def _json_snapshot(obj, what: str):
    """A deep JSON copy of `obj`, or an error naming the first entry JSON cannot hold."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError):
        where = _first_unserialisable(obj) or "?"
        raise ValueError(f"{what} must be JSON-serialisable; {what}{where} is not (convert dataclasses "
                         f"with dataclasses.asdict, arrays with .tolist())") from None


class RunCheckpointer:
    """Orbax checkpoints of a training run, every `save_interval_steps`, keeping the last `keep`.

    All processes must call `save` and `restore` together (both are collective in
    multi-host runs), each passing its own `data_state`. With `async_save`, `save`
    returns once the arrays are copied off the devices (so the caller may donate
    or overwrite them) and the files are written in the background; the next
    `save`, `wait` or `close` waits for it. Besides the interval, Orbax also saves
    the first step of a run with no checkpoint yet, and any step at which a
    preemption notice was received (TPU maintenance events).

    A writer deletes the unfinished saves it finds at start-up (they are what a
    killed run leaves). Any other process that opens a live run's directory
    (evaluation, export) must pass `read_only=True`, or it would delete the save
    the run is writing; a read-only checkpointer never saves or deletes.
    """

    def __init__(self, directory, *, keep: int | None = 3, async_save: bool = True, save_interval_steps: int = 1,
                 read_only: bool = False):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be at least 1 (or None to keep every checkpoint), got {keep}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be at least 1, got {save_interval_steps}")
        self.directory = as_path(directory)
        self._read_only = read_only
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep) if keep is not None else None,
            enable_async_checkpointing=async_save,
            # Interrupted saves of an earlier process are removed on start-up (in the background;
            # the first save waits for it).
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            STATE: ocp.PyTreeCheckpointHandler(), METADATA: ocp.JsonCheckpointHandler(),
            DATA_STATE: DataStateHandler()})

    def save(self, step: int, state, *, data_state: dict | None = None, metadata: dict | None = None,
             force: bool = False) -> bool:
        """Save `state` (any pytree of arrays) at `step` if the interval says so (or `force`).

        Returns True if a save was started. A step that is already saved is skipped.
        """
        if self._read_only:
            raise ValueError(f"this RunCheckpointer on {self.directory} is read-only; it cannot save step {step}")
        step = int(step)
        if step in self._manager.all_steps():  # complete, or being written by the previous save
            log.info("checkpoint for step %d already exists in %s; not saving it again", step, self.directory)
            return False
        items = {STATE: ocp.args.PyTreeSave(state)}
        if metadata is not None:
            items[METADATA] = ocp.args.JsonSave(_json_snapshot(metadata, "metadata"))
        if data_state is not None:
            items[DATA_STATE] = DataStateSave(_json_snapshot(data_state, "data_state"))
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            log.info("saving checkpoint for step %d to %s", step, self.directory)
        return saved

    def latest_step(self) -> int | None:
        """The latest complete checkpoint (a save still being written is not counted)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, ascending."""
        if self._read_only:
            self._manager.reload()  # the writer is another process: read the directory afresh
        in_flight = self._manager.is_saving_in_progress()
        steps = sorted(self._manager.all_steps())
        if in_flight and steps:
            # Orbax lists a step as soon as its save starts; only finalised ones count here.
            steps = [s for s in steps if ocp.path.step.is_path_finalized(self.directory / str(s))]
        return steps

    def restore(self, step: int | None = None, *, target, restore_data_state: bool = True,
                partial: bool = False) -> tuple[Any, dict | None, dict | None]:
        """Restore `(state, data_state, metadata)` of `step` (default: the latest complete one).

        `target` is an abstract pytree (see `abstract_target`) whose leaves carry
        the shardings to restore into: the saved mesh shape does not matter.
        With `partial`, the target may be a subset of the saved tree (e.g.
        `{"params": ...}` to start a new run from a checkpoint's weights).
        `data_state` / `metadata` are None when the checkpoint has none (or when
        `restore_data_state` is False).
        """
        self.wait()
        step_dir = resolve_step_dir(self.directory, step)
        where = f"checkpoint {step_dir}"
        stored = stored_leaves(step_dir / STATE)
        # Saved before layers were scanned: read each layer, stack them (checkpointing/layout.py).
        convert = bool(per_layer_plan(target, stored))
        item = per_layer_target(target) if convert else target
        if convert:
            log.info("%s holds one entry per layer; stacking them into the scanned layout", where)
        else:
            _check_layout(target, stored, where)
        check_target(item, stored, where, partial=partial)
        items = {STATE: ocp.args.PyTreeRestore(item=item, restore_args=restore_args_for(item),
                                               partial_restore=partial)}
        if (step_dir / METADATA).exists():
            items[METADATA] = ocp.args.JsonRestore()
        if restore_data_state and (step_dir / DATA_STATE).exists():
            items[DATA_STATE] = DataStateRestore()
        if int(step_dir.name) not in self._manager.all_steps():
            self._manager.reload()  # written by another process since this checkpointer was opened
        restored = self._manager.restore(int(step_dir.name), args=ocp.args.Composite(**items))
        state = to_scanned(target, restored[STATE]) if convert else restored[STATE]
        return (state, restored[DATA_STATE] if DATA_STATE in items else None,
                restored[METADATA] if METADATA in items else None)

    def reached_preemption(self, step: int) -> bool:
        """True once the cluster announced a preemption (all processes agree at `step`).

        The save at such a step happens regardless of the interval; the loop should
        then `wait()` and exit.
        """
        return self._manager.reached_preemption(int(step))

    def wait(self) -> None:
        """Block until any asynchronous save has been written and finalised."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release Orbax's background threads."""
        self._manager.close()

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_layout(target, stored, where: str) -> None:
    message = scanned_but_target_is_not(target, stored)
    if message:
        raise ValueError(f"{where}: {message}")


def read_metadata(step_dir: epath.Path) -> dict | None:
    """The JSON metadata of a complete step directory, or None when it has none."""
    path = step_dir / METADATA / "metadata"
    return json.loads(path.read_text()) if path.exists() else None


def load_params(path, step: int | None = None, *, target=None, params_key: str = "params"):
    """The params of a checkpoint, and nothing else of the run state.

    `path` is a run directory (`step=None`: latest complete step) or one step
    directory; checkpoints written by `average_checkpoints` work the same way.
    With `target` (an abstract params tree with shardings, e.g.
    `abstract_target(params_shape_tree, model_shardings(config, mesh))`) the
    params come back as that tree of sharded arrays, ready for `nnx.merge`.
    Without it they come back as host numpy arrays in nested dicts keyed as
    saved (an nnx Variable's array sits under the key "value").
    `params_key` selects another entry of the state, e.g. "ema_params".
    """
    step_dir = resolve_step_dir(path, step)
    stored = stored_leaves(step_dir / STATE)
    where = f"checkpoint {step_dir}"
    convert = False  # host arrays come back as saved; only a target can ask for the scanned layout
    if target is None:
        leaves = [leaf for leaf in stored.values() if leaf.path[0] == params_key]
        if not leaves:
            tops = sorted({leaf.path[0] for leaf in stored.values()})
            raise ValueError(f"{where} has no '{params_key}' entry; its state holds {tops}")
        item, restore_args = host_target(leaves)
    else:
        wanted = {params_key: target}
        # Saved before layers were scanned: read each layer, stack them (checkpointing/layout.py).
        convert = bool(per_layer_plan(wanted, stored))
        item = per_layer_target(wanted) if convert else wanted
        if not convert:
            _check_layout(item, stored, where)
        check_target(item, stored, where, partial=True)
        restore_args = restore_args_for(item)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    return to_scanned(wanted, restored)[params_key] if convert else restored[params_key]
