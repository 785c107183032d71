"""What every trainer does after it has data, a model and an objective.

Builds the optimizer and train state, compiles the step once, resumes, runs
the host loop with metrics/eval/checkpoints and returns a summary. A trainer
supplies only its pieces (`sft.py`, `rm.py`, `dpo.py`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import jax
import ml_collections

from posttrain_jax.checkpointing import RunCheckpointer
from posttrain_jax.checkpointing.metadata import run_metadata
from posttrain_jax.metrics import MetricsWriter, measure_matmul_peak
from posttrain_jax.sharding import batch_sharding, data_shards, logical_rules, shard_batch
from posttrain_jax.models.lora import dropout_rate
from posttrain_jax.train import init_train_state, jit_train_step, make_train_step, optimizer_from_config
from posttrain_jax.train import trainable_split
from posttrain_jax.train.loop import LoopConfig, resume_from_latest, train_loop

log = logging.getLogger(__name__)


def loop_config(**overrides) -> ml_collections.ConfigDict:
    base = dict(steps=0, accum_steps=1, ema_decay=0.0, log_every=25, eval_every=0, checkpoint_every=0,
                keep_checkpoints=3, async_checkpoint=True, peak_flops=0.0)
    return ml_collections.ConfigDict({**base, **overrides})


def total_steps_of(config, train_iter) -> int:
    steps = config.train.steps or train_iter.num_batches
    if steps > train_iter.num_batches:
        raise ValueError(f"train.steps={config.train.steps} but the data gives only {train_iter.num_batches} "
                         f"batches; raise a source's epochs or lower train.steps")
    return steps


def run(config: ml_collections.ConfigDict, *, mesh, rules, model, train_iter, objective, denominator,
        total_steps: int, seq_len: int, evaluate: Callable | None = None, derived: Callable | None = None,
        prepare: Callable | None = None, resume: bool = False, frozen=None, prepare_uses_state: bool = False,
        batch_shardings=None) -> dict:
    """Train `model` on `train_iter`; returns {paths, eval_before/after, final_step, compilations, ...}.

    evaluate(params) -> dict of held-out metrics (before, every eval_every steps, after).
    prepare(host_batch, step) -> global batch (default: shard over the mesh's batch axes);
    with `prepare_uses_state`, prepare(host_batch, step, state) (e.g. to sample from the current params).
    frozen: params of a frozen model passed to every step (see `posttrain_jax.train.step`).
    batch_shardings: the step's batch shardings (default: every key [batch, ...] over the batch axes).
    """
    started = time.time()
    t = config.train
    tx, schedule = optimizer_from_config(config.optim, total_steps)
    trainable, base, full = trainable_split(model)
    graphdef, state = init_train_state(model, tx, seed=config.seed, ema=t.ema_decay > 0, mesh=mesh,
                                       trainable=trainable)
    step = make_train_step(graphdef, tx, objective, denominator, accum_steps=t.accum_steps,
                           data_shards=data_shards(mesh),
                           ema_decay=t.ema_decay or None, schedule=schedule, dropout=dropout_rate(model) > 0)
    # LoRA: the frozen base is bound to the step (an argument of the jitted function, never donated).
    jitted = jit_train_step(step, state, batch_shardings or batch_sharding(mesh, rules), frozen=frozen, base=base)
    step_fn = jitted if frozen is None else (lambda s, b: jitted(s, b, frozen))
    if base is not None and prepare is not None and prepare_uses_state:  # prepare sees the whole model
        user_prepare = prepare
        prepare = lambda b, n, s: user_prepare(b, n, s.replace(params=full(s.params)))  # noqa: E731
    checkpointer = RunCheckpointer(os.path.join(config.output_dir, "checkpoints"), keep=t.keep_checkpoints,
                                   async_save=t.async_checkpoint)
    start = 0
    if resume:
        state, start = resume_from_latest(checkpointer, state, train_iter)
    writer = MetricsWriter(config.output_dir)
    summary = {"output_dir": config.output_dir, "checkpoints": checkpointer.directory.as_posix(),
               "metrics": writer.path, "total_steps": total_steps}
    if evaluate is not None:
        summary["eval_before"] = evaluate(full(state.params))
        writer.log(start, summary["eval_before"], prefix="eval")
        log.info("held-out before training: %s", format_metrics(summary["eval_before"]))
    loop_cfg = LoopConfig(total_steps=total_steps, log_every=t.log_every, eval_every=t.eval_every,
                          checkpoint_every=t.checkpoint_every, peak_flops=t.peak_flops or measure_matmul_peak(),
                          flops_per_token=model.config.flops_per_token(seq_len))
    prepare = prepare or (lambda b, _: shard_batch(b, mesh, rules))
    with jax.set_mesh(mesh), logical_rules(rules):
        state, last = train_loop(state, step_fn, train_iter, prepare, loop_cfg, writer=writer,
                                 checkpointer=checkpointer, start_step=start, metadata=run_metadata(config, model),
                                 derived=derived, prepare_uses_state=prepare_uses_state,
                                 evaluate=(lambda s, _: evaluate(full(s.params))) if evaluate else None)
    checkpointer.close()
    if evaluate is not None:
        summary["eval_after"] = evaluate(full(state.params))
        writer.log(last, summary["eval_after"], prefix="eval")
    writer.close()
    summary.update(final_step=last, wall_time_s=time.time() - started, graphdef=graphdef, params=full(state.params),
                   compilations=jitted._cache_size())  # 1: no recompilation after the first step
    return summary


def format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())

