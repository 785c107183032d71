"""SFT loss aggregation (Tülu 3 §4.3's ablation, made exact).

Every mode is written as per-token weights `w` and one global denominator `D`:

    loss = sum_over_global_batch(nll * w) / D

The train step sums `nll * w` (and its gradient) over all micro-batches and
devices, then divides by `D` once. Because `w` depends only on a token's own
sequence (or, for the legacy mode, on its micro-batch), `sum`, `token_mean` and
`sequence_mean` give the same gradient for every split of a global batch into
devices x accumulation steps x micro-batches.

- `sum`: w = loss mask, D = a constant (`sum_constant`; default the number of
  rows of the global batch, i.e. sequences when not packing). Tülu 3 summed
  token losses; dividing by a constant only rescales the learning rate.
- `token_mean`: w = loss mask, D = loss tokens in the whole global batch
  (what transformers' `num_items_in_batch` fix computes).
- `sequence_mean`: w = mask / (loss tokens of the token's sequence),
  D = sequences with at least one loss token in the global batch.
- `mean_per_microbatch`: w = mask / (loss tokens of the token's device-local
  micro-batch), D = accumulation steps x data shards: each device averages its
  own micro-batch, then gradients are averaged (the legacy behaviour Tülu 3
  identified; kept only for ablations).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("sum", "token_mean", "sequence_mean", "mean_per_microbatch")


def _sequence_token_counts(loss_mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """For each token, the number of loss tokens in its (row, segment) sequence. [batch, length]."""
    rows, length = segment_ids.shape
    ids = (jnp.arange(rows)[:, None] * (length + 1) + segment_ids).reshape(-1)
    counts = jax.ops.segment_sum(loss_mask.reshape(-1), ids, num_segments=rows * (length + 1))
    return counts[ids].reshape(rows, length)


def sft_token_weights(loss_mask: jax.Array, segment_ids: jax.Array, aggregation: str,
                      data_shards: int = 1) -> jax.Array:
    """Per-token weights of one micro-batch [rows, length] (rows ordered shard-major)."""
    mask = loss_mask.astype(jnp.float32)
    if aggregation in ("sum", "token_mean"):
        return mask
    if aggregation == "sequence_mean":
        return mask / jnp.maximum(_sequence_token_counts(mask, segment_ids), 1.0)
    if aggregation == "mean_per_microbatch":
        per_shard = mask.reshape(data_shards, -1)
        counts = jnp.maximum(per_shard.sum(axis=1, keepdims=True), 1.0)
        return (per_shard / counts).reshape(mask.shape)
    raise ValueError(f"unknown loss_aggregation {aggregation!r}; choose one of {AGGREGATIONS}")


def sft_denominator(loss_mask: jax.Array, segment_ids: jax.Array, aggregation: str, *, accum_steps: int = 1,
                    data_shards: int = 1, sum_constant: float | None = None) -> jax.Array:
    """The one divisor D for the whole global batch [global_rows, length]."""
    mask = loss_mask.astype(jnp.float32)
    if aggregation == "sum":
        return jnp.asarray(sum_constant if sum_constant is not None else mask.shape[0], jnp.float32)
    if aggregation == "token_mean":
        return jnp.maximum(mask.sum(), 1.0)
    if aggregation == "sequence_mean":
        # Each sequence's weights sum to 1, so their total counts the sequences with a loss token.
        return jnp.maximum(jnp.round(sft_token_weights(mask, segment_ids, aggregation).sum()), 1.0)
    if aggregation == "mean_per_microbatch":
        return jnp.asarray(accum_steps * data_shards, jnp.float32)
    raise ValueError(f"unknown loss_aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
