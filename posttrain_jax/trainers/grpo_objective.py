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
from posttrain_jax.losses.grpo import token_entropy
from posttrain_jax.losses.logprobs import token_logprobs, token_logprobs_from_hidden


def _scaled_head(model, temperature: float):
    return lambda h: model.head(h).astype(jnp.float32) / temperature


def sequence_token_logps(model, batch, *, temperature: float = 1.0, chunk_size: int | None = None) -> jax.Array:
    """log p(targets) [rows, length] under `model` (no gradient needed: old policy, reference)."""
    hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    return token_logprobs_from_hidden(_scaled_head(model, temperature), hidden, batch["targets"], chunk_size)


def make_grpo_objective(*, aggregation: str, epsilon_low: float, epsilon_high: float, beta: float,
                        kl_estimator: str, temperature: float, chunk_size: int | None = None):
    """`objective(model, micro_batch, context) -> (sum of weighted token losses, metric sums)`.

    Entropy is reported when logits are materialised whole (no `chunk_size`).
    """

    def objective(model, mb, context=None):
        hidden, _ = model.hidden_states(mb["tokens"], mb["positions"], mb["segment_ids"])
        extra = {}
        if chunk_size:
            logps = token_logprobs_from_hidden(_scaled_head(model, temperature), hidden, mb["targets"], chunk_size)
        else:
            logits = _scaled_head(model, temperature)(hidden)
            logps = token_logprobs(logits, mb["targets"])
            extra["entropy"] = token_entropy(jax.lax.stop_gradient(logits))
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
