"""The GRPO objective of one micro-batch and the log-prob pass for old / reference policies.

A micro-batch holds prompt + completion rows as built by `rollout.training_batch`
plus `advantages` [rows], `sample_mask` [rows] and, when needed, `old_logps` /
`ref_logps` [rows, length]. Log-probs are those of `log_softmax(logits / T)`,
T the sampling temperature, as in TRL, so they are comparable with the
sampler's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from posttrain_jax.losses.grpo import grpo_denominator, grpo_metric_sums, grpo_token_loss, grpo_token_weights
from posttrain_jax.losses.logprobs import lm_head_logprobs


def sequence_token_logps(model, batch, *, temperature: float = 1.0, chunk_size: int | None = None) -> jax.Array:
    """log p(targets) [rows, length] under `model` (no gradient needed: old policy, reference)."""
    hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    return lm_head_logprobs(model, hidden, batch["targets"], temperature=temperature, chunk_size=chunk_size).logps


def make_grpo_objective(*, aggregation: str, epsilon_low: float, epsilon_high: float, beta: float,
                        kl_estimator: str, temperature: float, chunk_size: int | None = None):
    """`objective(model, micro_batch, context) -> (sum of weighted token losses, metric sums)`.

    Log-probs and the (gradient-free) entropy metric come from the fused LM head; `chunk_size`
    None/0 picks the chunk.
    """

    def objective(model, mb, context=None):
        hidden, _ = model.hidden_states(mb["tokens"], mb["positions"], mb["segment_ids"])
        out = lm_head_logprobs(model, hidden, mb["targets"], temperature=temperature, chunk_size=chunk_size,
                               with_entropy=True)
        logps, extra = out.logps, {"entropy": jax.lax.stop_gradient(out.entropy)}
        mask = mb["loss_mask"].astype(jnp.float32)
        loss, terms = grpo_token_loss(logps, mb.get("old_logps"), mb["advantages"], mask, epsilon_low=epsilon_low,
                                      epsilon_high=epsilon_high, beta=beta, ref_logps=mb.get("ref_logps"),
                                      kl_estimator=kl_estimator)
        weights = grpo_token_weights(mask, aggregation, sample_mask=mb["sample_mask"])
        sums = grpo_metric_sums({**terms, **extra}, mask * mb["sample_mask"][:, None])
        return jnp.sum(loss * weights), sums

    return objective


def make_grpo_denominator(aggregation: str, *, max_completion_length: int):
    def denominator(batch):
        return grpo_denominator(batch["loss_mask"], aggregation, sample_mask=batch["sample_mask"],
                                max_completion_length=max_completion_length)
    return denominator
