"""The SFT objective of one micro-batch, for `posttrain_jax.train.make_train_step`."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from posttrain_jax.losses.logprob_sum import fused_logprob_sum
from posttrain_jax.losses.logprobs import lm_head_logprobs
from posttrain_jax.losses.sft import AGGREGATIONS, sft_denominator, sft_token_weights
from posttrain_jax.models.attention import traced_platform

LOSS_PASSES = ("auto", "one_pass", "recompute")


def make_sft_objective(aggregation: str, *, data_shards: int = 1, loss_chunk_size: int | None = None,
                       loss_pass: str = "auto"):
    """`objective(model, micro_batch) -> (sum of weighted token NLLs, metric sums)`.

    The LM head and softmax are fused; `loss_chunk_size` None/0 picks the chunk. `loss_pass`:
    "one_pass" takes the head's gradient in the forward pass (`losses.logprob_sum`: 3 LM-head
    matmuls, a float32 kernel-sized accumulator), "recompute" recomputes each chunk's logits in
    the backward pass (`losses.logprobs`: 4 matmuls, one vocabulary slice of gradient at a time),
    "auto" one_pass on CPU and recompute on TPU / GPU. The two agree to float32 rounding. Where FSDP
    shards the kernel's hidden dimension one_pass recomputes too (`fused_logprob_sum` would otherwise
    gather the whole kernel on every device).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss_aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    if loss_pass not in LOSS_PASSES:
        raise ValueError(f"train.loss_pass={loss_pass!r} is not one of {', '.join(LOSS_PASSES)}")

    def objective(model, mb, context=None):  # SFT needs no global quantity but the denominator
        hidden, _ = model.hidden_states(mb["tokens"], mb["positions"], mb["segment_ids"])
        mask = mb["loss_mask"].astype(jnp.float32)
        weights = sft_token_weights(mask, mb["segment_ids"], aggregation, data_shards)
        one_pass = loss_pass == "one_pass" or (loss_pass == "auto" and traced_platform() == "cpu")
        if one_pass and model.config.head == "lm":
            kernel, vocab_major = model.head_kernel()
            total, logps = fused_logprob_sum(hidden, kernel, mb["targets"], weights, vocab_major=vocab_major,
                                             softcap=model.config.final_logit_softcap, chunk_size=loss_chunk_size)
            return -total, {"nll_sum": -jnp.sum(logps * mask), "loss_tokens": jnp.sum(mask)}
        nll = -lm_head_logprobs(model, hidden, mb["targets"], chunk_size=loss_chunk_size).logps
        return jnp.sum(nll * weights), {"nll_sum": jnp.sum(nll * mask), "loss_tokens": jnp.sum(mask)}

    return objective


def make_sft_denominator(aggregation: str, *, accum_steps: int = 1, data_shards: int = 1,
                         sum_constant: float | None = None):
    """`denominator(global_batch) -> D` for the chosen aggregation."""
    def denominator(batch):
        return sft_denominator(batch["loss_mask"], batch["segment_ids"], aggregation, accum_steps=accum_steps,
                               data_shards=data_shards, sum_constant=sum_constant)
    return functools.wraps(denominator)(denominator)
