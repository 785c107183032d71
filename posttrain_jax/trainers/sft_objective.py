"""The SFT objective of one micro-batch, for `posttrain_jax.train.make_train_step`."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from posttrain_jax.losses.logprobs import lm_head_logprobs
from posttrain_jax.losses.sft import AGGREGATIONS, sft_denominator, sft_token_weights


def make_sft_objective(aggregation: str, *, data_shards: int = 1, loss_chunk_size: int | None = None):
    """`objective(model, micro_batch) -> (sum of weighted token NLLs, metric sums)`.

    The LM head and softmax are fused (`lm_head_logprobs`); `loss_chunk_size` None/0 picks the chunk.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss_aggregation {aggregation!r}; choose one of {AGGREGATIONS}")

    def objective(model, mb, context=None):  # SFT needs no global quantity but the denominator
        hidden, _ = model.hidden_states(mb["tokens"], mb["positions"], mb["segment_ids"])
        nll = -lm_head_logprobs(model, hidden, mb["targets"], chunk_size=loss_chunk_size).logps
        mask = mb["loss_mask"].astype(jnp.float32)
        weights = sft_token_weights(mask, mb["segment_ids"], aggregation, data_shards)
        return jnp.sum(nll * weights), {"nll_sum": jnp.sum(nll * mask), "loss_tokens": jnp.sum(mask)}

    return objective


def make_sft_denominator(aggregation: str, *, accum_steps: int = 1, data_shards: int = 1,
                         sum_constant: float | None = None):
    """`denominator(global_batch) -> D` for the chosen aggregation."""
    def denominator(batch):
        return sft_denominator(batch["loss_mask"], batch["segment_ids"], aggregation, accum_steps=accum_steps,
                               data_shards=data_shards, sum_constant=sum_constant)
    return functools.wraps(denominator)(denominator)
