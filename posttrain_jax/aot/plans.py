"""Each trainer's train step as its trainer builds it, from config alone: no data, no tokenizer, no weights.

A plan holds the model config, the objective and denominator the trainer
passes to `make_train_step`, and the global batch as ShapeDtypeStructs with
the keys, dtypes and shapes its data pipeline produces. Rows per step: the
trainer's own setting (`train.global_batch`, `train.global_pairs`,
`grpo.prompts_per_step x group_size / num_minibatches`), or
`per_chip_batch x (data x fsdp) x accum_steps` when given.

Like a trainer, this is command-level wiring (`posttrain-jax aot`), so it takes each
trainer's objective from `posttrain_jax.trainers` (the loss wiring of that trainer's
main(config)); no library layer below the commands imports `trainers/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from posttrain_jax.models import preset
from posttrain_jax.models.config import ModelConfig

SEQUENCE_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")  # [rows, seq_len] int32


@dataclasses.dataclass
class StepPlan:
    model: ModelConfig
    objective: Callable
    denominator: Callable
    batch: dict[str, jax.ShapeDtypeStruct]  # global shapes, no shardings yet
    accum_steps: int
    ema: bool
    rows: int
    seq_len: int


def model_config(cfg: ml_collections.ConfigDict, *, head: str) -> ModelConfig:
    """The `model` section's architecture and numerics, read without loading any weights."""
    # Every other key of the section (dtype, param_dtype, remat, attention, ...) is a ModelConfig field,
    # applied as build_model applies it.
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    numerics = {k: cfg[k] for k in cfg.keys() if k in fields and k not in ("preset", "hf_path", "checkpoint")}
    numerics["head"] = head
    if cfg.hf_path:
        from posttrain_jax.models.hf_config import from_hf_config
        path = os.path.join(cfg.hf_path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"model.hf_path: {path} does not exist (a Hugging Face model directory)")
        with open(path) as f:
            return from_hf_config(json.load(f), **numerics)
    if cfg.checkpoint:
        from posttrain_jax.checkpointing import MODEL_CONFIG_KEY, read_metadata, resolve_step_dir
        from posttrain_jax.models.config import model_config_from_dict
        step_dir = resolve_step_dir(cfg.checkpoint)
        meta = read_metadata(step_dir) or {}
        if MODEL_CONFIG_KEY not in meta:
            raise ValueError(f"model.checkpoint: {step_dir} has no model config in its metadata")
        return model_config_from_dict(meta[MODEL_CONFIG_KEY]).replace(**numerics)
    return preset(cfg.preset, **numerics)


def _rows(default_rows: int, per_chip_batch: int | None, shards: int, accum_steps: int) -> int:
    rows = per_chip_batch * shards * accum_steps if per_chip_batch else default_rows
    if rows % (shards * accum_steps):
        raise ValueError(f"{rows} rows per step do not split over {shards} data shards x {accum_steps} accumulation "
                         f"steps; pass --per-chip-batch or change the trainer's batch size")
    return rows


def _sequences(rows: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32) for k in SEQUENCE_KEYS}


def sft_plan(config, shards: int, per_chip_batch: int | None) -> StepPlan:
    from posttrain_jax.trainers.sft_objective import make_sft_denominator, make_sft_objective
    t = config.train
    rows = _rows(t.global_batch, per_chip_batch, shards, t.accum_steps)
    return StepPlan(
        model=model_config(config.model, head="lm"),
        objective=make_sft_objective(t.loss_aggregation, data_shards=shards, loss_chunk_size=t.loss_chunk_size or None,
                                     loss_pass=t.get("loss_pass", "auto")),  # one_pass: a kernel-sized buffer (not under FSDP)
        denominator=make_sft_denominator(t.loss_aggregation, accum_steps=t.accum_steps, data_shards=shards,
                                         sum_constant=t.sum_constant or None),
        batch=_sequences(rows, config.data.seq_len), accum_steps=t.accum_steps, ema=t.ema_decay > 0, rows=rows,
        seq_len=config.data.seq_len)


def _pair_batch(rows: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """One pair per row (no packing): `pairs_per_row` 1, as the preference pipeline makes without packing."""
    from posttrain_jax.data.preference import PAIR_KEYS
    batch = _sequences(rows, seq_len)
    batch.update({k: jax.ShapeDtypeStruct((rows, 1), jnp.float32 if k == "margin" else jnp.int32) for k in PAIR_KEYS})
    return batch


def rm_plan(config, shards: int, per_chip_batch: int | None) -> StepPlan:
    from posttrain_jax.trainers.rm import make_rm_objective, pair_denominator
    t = config.train
    rows = _rows(t.global_pairs, per_chip_batch, shards, t.accum_steps)
    objective, _ = make_rm_objective(pairs_per_row=1, use_margin=t.use_margin, center_coef=t.center_coef)
    return StepPlan(model=model_config(config.model, head="scalar"), objective=objective,
                    denominator=pair_denominator, batch=_pair_batch(rows, config.data.seq_len),
                    accum_steps=t.accum_steps, ema=t.ema_decay > 0, rows=rows, seq_len=config.data.seq_len)


def dpo_plan(config, shards: int, per_chip_batch: int | None) -> StepPlan:
    from posttrain_jax.trainers.dpo import REFERENCE_FREE, make_denominator, make_dpo_objective, make_pair_logps
    t = config.train
    rows = _rows(t.global_pairs, per_chip_batch, shards, t.accum_steps)
    # The objective receives a merged model, so no graphdef is needed here.
    pair_logps = make_pair_logps(None, pairs_per_row=1, loss_chunk_size=t.loss_chunk_size or None)
    objective, _ = make_dpo_objective(t, pair_logps)
    batch = _pair_batch(rows, config.data.seq_len)
    if t.loss_type not in REFERENCE_FREE:  # the reference's log-probs arrive with the batch
        batch.update({k: jax.ShapeDtypeStruct((rows, 1), jnp.float32) for k in ("ref_chosen", "ref_rejected")})
    return StepPlan(model=model_config(config.model, head="lm"), objective=objective,
                    denominator=make_denominator(t), batch=batch, accum_steps=t.accum_steps, ema=t.ema_decay > 0,
                    rows=rows, seq_len=config.data.seq_len)


def grpo_plan(config, shards: int, per_chip_batch: int | None) -> StepPlan:
    """GRPO's optimizer step on one minibatch of rollouts (prompt + completion rows); sampling is not compiled.

    The step is the RL loop's policy update (`posttrain_jax.rl`) with the `grpo` section's settings,
    fed the batch keys the loop feeds it.
    """
    from posttrain_jax.rl.loop import FORWARD_KEYS, PER_ROW, policy_keys
    from posttrain_jax.rl.objectives import make_policy_denominator, make_policy_objective
    from posttrain_jax.trainers.grpo import settings
    g, s, t = config.grpo, config.sampling, config.train
    rl = settings(g)
    rollout_rows = g.prompts_per_step * g.group_size
    if rollout_rows % g.num_minibatches:
        raise ValueError(f"grpo.num_minibatches={g.num_minibatches} does not divide {rollout_rows} rollout rows")
    rows = _rows(rollout_rows // g.num_minibatches, per_chip_batch, shards, t.accum_steps)
    seq_len = config.data.max_prompt_length + s.max_new_tokens
    batch = _sequences(rows, seq_len)
    for key in policy_keys(rl):
        if key not in FORWARD_KEYS:
            shape = (rows,) if key in PER_ROW else (rows, seq_len)
            batch[key] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return StepPlan(model=model_config(config.model, head="lm"),
                    objective=make_policy_objective(rl, temperature=s.temperature),
                    denominator=make_policy_denominator(rl, max_completion_length=s.max_new_tokens),
                    batch=batch, accum_steps=t.accum_steps, ema=False, rows=rows, seq_len=seq_len)


PLANS = {"sft": sft_plan, "rm": rm_plan, "dpo": dpo_plan, "grpo": grpo_plan}
