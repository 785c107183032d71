"""The host loop shared by the trainers: batches in, steps, metrics, eval, checkpoints.

Metrics are fetched from the device only every `log_every` steps, so the loop
never waits on the step it just dispatched except at those points.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from posttrain_jax.checkpointing import RunCheckpointer, abstract_target
from posttrain_jax.metrics import MetricsWriter, Throughput, progress_bar

log = logging.getLogger(__name__)

# Fault injection for the crash-resume tests: SIGKILL this process right after
# step N, while that step's asynchronous checkpoint save is still being written,
# or, with ..._AFTER_SAVE=1, once every started save is complete.
_KILL_AT_STEP = int(os.environ.get("POSTTRAIN_JAX_TEST_SIGKILL_AT_STEP", "0"))
_KILL_AFTER_SAVE = os.environ.get("POSTTRAIN_JAX_TEST_SIGKILL_AFTER_SAVE") == "1"


@dataclasses.dataclass
class LoopConfig:
    total_steps: int
    log_every: int = 10
    eval_every: int = 0  # 0: only before and after training
    checkpoint_every: int = 0  # 0: only at the end
    flops_per_token: float = 0.0
    peak_flops: float | None = None


def resume_from_latest(checkpointer: RunCheckpointer, state, data_iter) -> tuple[Any, int]:
    """Restore the latest complete checkpoint into `state`'s shardings; returns (state, step)."""
    step = checkpointer.latest_step()
    if step is None:
        log.info("no checkpoint in %s: starting from scratch", checkpointer.directory)
        return state, 0
    restored, data_state, _ = checkpointer.restore(step, target=abstract_target(state))
    if data_state is not None:
        data_iter.set_state(data_state)
    log.info("resumed from step %d of %s", step, checkpointer.directory)
    return restored, step


def train_loop(state, step_fn: Callable, batches: Iterator[dict[str, np.ndarray]],
               shard: Callable[[dict[str, np.ndarray], int], dict[str, jax.Array]], cfg: LoopConfig, *,
               writer: MetricsWriter, checkpointer: RunCheckpointer | None = None, start_step: int = 0,
               metadata: dict | None = None, evaluate: Callable[[Any, int], dict] | None = None,
               derived: Callable[[dict], dict] | None = None, prepare_uses_state: bool = False):
    """Run steps `start_step+1 .. total_steps`; returns the final state.

    `batches` must provide `get_state()` (saved with every checkpoint).
    `shard(host_batch, step)` makes the global batch of `step` (1-based: batch index step - 1).
    `derived(host_metrics)` may add metrics computed from the fetched sums.
    With `prepare_uses_state`, `shard(host_batch, step, state)` also gets the current state (on-policy data).
    """
    throughput = Throughput(cfg.flops_per_token, cfg.peak_flops)
    bar = progress_bar(cfg.total_steps, initial=start_step)
    step = last_saved = start_step
    pending = None
    for host_batch in batches:
        if step >= cfg.total_steps:
            break
        step += 1
        batch = shard(host_batch, step, state) if prepare_uses_state else shard(host_batch, step)
        state, metrics = step_fn(state, batch)
        throughput.add(int(np.count_nonzero(host_batch["segment_ids"])) * jax.process_count())
        bar.update(1)
        pending = metrics
        if step % cfg.log_every == 0 or step == cfg.total_steps:
            host = jax.device_get(pending)  # the only device sync of the loop
            if derived is not None:
                host.update(derived(host))
            row = writer.log(step, {**host, **throughput.report()})
            bar.set_postfix(loss=f"{row.get('train/loss', float('nan')):.4f}",
                            tok_s=f"{row.get('train/tokens_per_s', 0):.0f}")
        if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_steps:
            writer.log(step, evaluate(state, step), prefix="eval")
        if checkpointer is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            checkpointer.save(step, state, data_state=batches.get_state(), metadata=metadata, force=True)
            last_saved = step
        if step == _KILL_AT_STEP:
            if _KILL_AFTER_SAVE and checkpointer is not None:
                checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    if step < cfg.total_steps:
        log.warning("data ran out after %d of %d steps", step, cfg.total_steps)
    if checkpointer is not None:
        if step > last_saved:
            checkpointer.save(step, state, data_state=batches.get_state(), metadata=metadata, force=True)
        checkpointer.wait()
    return state, step


def print_paths(summary: dict) -> None:
    """Print (process 0) where a finished run's checkpoints and metrics are: `summary` from a trainer's run."""
    if jax.process_index() == 0:
        print(f"trained {summary['final_step']} steps in {summary['wall_time_s']:.0f} s")
        print(f"checkpoints: {summary['checkpoints']}\nmetrics:     {summary['metrics']} (+ tensorboard/)")
