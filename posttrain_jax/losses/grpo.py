"""GRPO-family policy-gradient losses: group advantages, the clipped per-token objective, aggregation.

A rollout batch holds `num_groups` prompts x `group_size` completions, grouped
contiguously (completion i belongs to group i // group_size). Per-token arrays
are [completions, max_completion_length] with a 0/1 completion `mask`.

Objective per completion token (PPO's clipped surrogate, plus an optional KL
penalty towards a frozen reference, as in DeepSeekMath's GRPO and TRL):

    r    = exp(logp - old_logp)
    loss = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * KL

eps_high > eps_low is DAPO's clip-higher. Without old log-probs (one
optimisation pass per rollout, on-policy) old_logp = stop_gradient(logp), so
r = 1 and the gradient is -A * grad(logp), as in TRL.

Aggregation uses the same contract as `losses/sft.py`: per-token weights `w`
that depend only on a token's own completion, and ONE denominator `D` for the
whole global rollout batch, so the train step sums `loss * w` over micro-batches
and devices and divides once:

| aggregation     | w                          | D                                   | TRL 1.16 loss_type |
|-----------------|----------------------------|-------------------------------------|--------------------|
| `token_mean`    | mask                       | loss tokens of the global batch     | `dapo` (global); `bnpo` |
| `sequence_mean` | mask / tokens of its row   | completions                         | `grpo`             |
| `constant`      | mask                       | completions x max_completion_length | `dr_grpo`          |

TRL's `bnpo` divides by the tokens of each micro-batch and then averages the
micro-batches: equal to `token_mean` for one micro-batch on one process (the
goldens), the legacy per-micro-batch mean otherwise. `grpo` and `dr_grpo` count
every completion, also ones whose mask is all zero (TRL's
`mask_truncated_completions`); pass `sample_mask` to leave completions out of
the loss and of D (padding rows, zero-std groups).

Goldens and the exact TRL functions: scripts/make_grpo_goldens.py.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from posttrain_jax.rl.kl import KL_ESTIMATORS, kl_estimate
from posttrain_jax.rl.policy_loss import masked, token_policy_loss

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("token_mean", "sequence_mean", "constant")
# TRL 1.16 GRPOConfig.loss_type -> our aggregation (see the module docstring for bnpo).
TRL_LOSS_TYPES = {"dapo": "token_mean", "bnpo": "token_mean", "grpo": "sequence_mean", "dr_grpo": "constant"}


class GroupAdvantages(NamedTuple):
    advantages: jax.Array  # [completions] float32
    group_std: jax.Array  # [num_groups] float32, with `std_ddof`
    zero_std: jax.Array  # [completions] bool: every reward of the completion's group is equal


def group_advantages(rewards: jax.Array, group_size: int, *, scale: str = "group", std_ddof: int = 1,
                     eps: float = 1e-4) -> GroupAdvantages:
    """Group-relative advantages: reward minus its group's mean, optionally divided by a std.

    Args:
      rewards: [num_groups * group_size] scalar rewards, groups contiguous.
      group_size: completions per prompt (TRL's `num_generations`).
      scale: "group" divides by (group std + eps) (GRPO; TRL `scale_rewards="group"`),
        "batch" by (std of all rewards + eps) while still centring on the group mean
        (TRL "batch", PPO Lite), "none" only centres (Dr. GRPO).
      std_ddof: delta degrees of freedom of the std; 1 is torch.std / TRL's `nanstd`.
        A std over fewer than ddof + 1 values is 0 (TRL uses 0 for one completion per group).
      eps: added to the std, not clamped against it (TRL's 1e-4).
    Returns:
      GroupAdvantages(advantages [completions], group_std [num_groups], zero_std [completions]).
      `zero_std` marks groups whose rewards are all equal, whatever `scale` is: their
      advantages are exactly 0 (TRL's `frac_reward_zero_std` is its mean, except that in
      "batch" mode TRL tests the batch std instead).
    """
    if scale not in SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; choose one of {SCALES}")
    rewards = rewards.astype(jnp.float32)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be [num_groups * group_size] with group_size={group_size}, "
                         f"got shape {rewards.shape}")
    grouped = rewards.reshape(-1, group_size)
    mean = grouped.mean(axis=1, keepdims=True)
    group_std = _std(grouped, std_ddof, axis=1)
    advantages = grouped - mean
    if scale == "group":
        advantages = advantages / (group_std[:, None] + eps)
    elif scale == "batch":
        advantages = advantages / (_std(rewards, std_ddof, axis=0) + eps)
    # Exact equality, not a std threshold: identical rewards give advantage 0 in every mode.
    zero_std = jnp.repeat(grouped.max(axis=1) == grouped.min(axis=1), group_size)
    return GroupAdvantages(advantages.reshape(-1), group_std, zero_std)


def _std(values: jax.Array, ddof: int, axis: int) -> jax.Array:
    count = values.shape[axis]
    centred = values - values.mean(axis=axis, keepdims=True)
    return jnp.sqrt(jnp.sum(centred * centred, axis=axis) / max(count - ddof, 1))


def nonzero_std_sample_mask(advantages: GroupAdvantages) -> jax.Array:
    """[completions] float32: 1 where the completion's group has reward spread, 0 for zero-std groups.

    Pass it as `sample_mask` to `grpo_token_weights` / `grpo_denominator` to drop groups
    that carry no policy-gradient signal from the loss and its normaliser (DAPO's dynamic
    sampling filter, without resampling). Their KL term is dropped too.
    """
    return 1.0 - advantages.zero_std.astype(jnp.float32)


def grpo_token_loss(logps: jax.Array, old_logps: jax.Array | None, advantages: jax.Array, mask: jax.Array, *,
                    epsilon_low: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                    ref_logps: jax.Array | None = None,
                    kl_estimator: str = "k3") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token clipped policy-gradient loss plus beta * KL (see the module docstring).

    Args:
      logps: [completions, length] log-probs of the sampled tokens under the policy being trained.
      old_logps: [completions, length] under the policy that sampled them, or None (on-policy:
        stop_gradient(logps), ratio 1).
      advantages: [completions] (or [completions, length]) float.
      mask: [completions, length] 0/1 completion tokens. Other positions give loss 0 and
        gradient 0, even if their log-probs are -inf.
      epsilon_low, epsilon_high: clip range [1 - epsilon_low, 1 + epsilon_high]; epsilon_high
        None = epsilon_low (TRL's `epsilon`, `epsilon_high`).
      beta: KL coefficient (a float or a traced scalar); a Python 0 needs no reference.
      ref_logps: [completions, length] under the frozen reference (needed if beta != 0; if given
        with beta = 0 the KL is still returned as a metric).
      kl_estimator: with d = ref_logp - logp: "k1" = -d (log pi/pi_ref), "k2" = d^2 / 2,
        "k3" = exp(d) - d - 1 (Schulman's unbiased, non-negative estimator; TRL's and DeepSeekMath's).
    Returns:
      (per_token_loss [completions, length] float32, 0 off the mask, terms): per-token float32
      arrays `ratio`, `is_low_clipped` (r < 1 - eps_low and A < 0), `is_high_clipped`
      (r > 1 + eps_high and A > 0), `is_region_clipped` (either) and, with a reference, `kl`.
      Reduce them with `grpo_metric_sums`.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; choose one of {KL_ESTIMATORS}")
    # beta may be traced (a KL schedule); only a Python 0 skips the reference.
    no_kl = isinstance(beta, (int, float)) and beta == 0
    if ref_logps is None and not no_kl:
        raise ValueError(f"beta={beta} weights a KL penalty: pass ref_logps (or set beta=0)")
    loss, terms = token_policy_loss(logps, old_logps, advantages, mask, epsilon_low=epsilon_low,
                                    epsilon_high=epsilon_high)
    if ref_logps is not None:
        kl = jnp.where(mask > 0, kl_estimate(masked(logps, mask), masked(ref_logps, mask), kl_estimator), 0.0)
        terms["kl"] = kl
        if not no_kl:
            loss = loss + jnp.asarray(beta, jnp.float32) * kl
    return loss, terms


def _sample_weights(mask: jax.Array, sample_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    mask = mask.astype(jnp.float32)
    rows = jnp.ones(mask.shape[:1], jnp.float32) if sample_mask is None else sample_mask.astype(jnp.float32)
    return mask * rows[:, None], rows


def grpo_token_weights(mask: jax.Array, aggregation: str, *, sample_mask: jax.Array | None = None) -> jax.Array:
    """Per-token weights [completions, length] of one micro-batch (they depend only on each row).

    Args:
      mask: [completions, length] 0/1 completion tokens.
      aggregation: one of AGGREGATIONS (TRL_LOSS_TYPES maps TRL's names).
      sample_mask: [completions] 1 = counted, 0 = left out (padding rows, filtered groups).
    """
    mask, _ = _sample_weights(mask, sample_mask)
    if aggregation in ("token_mean", "constant"):
        return mask
    if aggregation == "sequence_mean":
        return mask / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
    raise ValueError(f"unknown GRPO loss aggregation {aggregation!r}; choose one of {AGGREGATIONS} "
                     f"(TRL names: {TRL_LOSS_TYPES})")


def grpo_denominator(mask: jax.Array, aggregation: str, *, sample_mask: jax.Array | None = None,
                     max_completion_length: int | None = None) -> jax.Array:
    """The one divisor D [] float32 for the whole global rollout batch.

    Args:
      mask: [global_completions, length] 0/1 completion tokens of the whole global batch.
      aggregation: one of AGGREGATIONS.
      sample_mask: [global_completions] as in `grpo_token_weights`.
      max_completion_length: Dr. GRPO's constant (TRL divides by the configured maximum, not
        the padded width); default `length`, the width our pipeline pads completions to.
    """
    mask, rows = _sample_weights(mask, sample_mask)
    if aggregation == "token_mean":
        return jnp.maximum(mask.sum(), 1.0)
    if aggregation == "sequence_mean":
        return jnp.maximum(rows.sum(), 1.0)
    if aggregation == "constant":
        width = mask.shape[1] if max_completion_length is None else max_completion_length
        return jnp.maximum(rows.sum(), 1.0) * jnp.float32(width)
    raise ValueError(f"unknown GRPO loss aggregation {aggregation!r}; choose one of {AGGREGATIONS} "
                     f"(TRL names: {TRL_LOSS_TYPES})")


def grpo_metric_sums(terms: dict[str, jax.Array], mask: jax.Array) -> dict[str, jax.Array]:
    """Masked token sums of per-token terms, plus `num_tokens`; divide globally for TRL's token means.

    TRL logs `kl`, `entropy` and `clip_ratio/{low,high,region}_mean` as sums over all
    completion tokens of all processes / the token count (its `global_masked_mean`).
    """
    mask = mask.astype(jnp.float32)
    sums = {key: jnp.sum(jnp.where(mask > 0, value.astype(jnp.float32) * mask, 0.0)) for key, value in terms.items()}
    sums["num_tokens"] = mask.sum()
    return sums


def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy in nats of the next-token distribution, [..., vocab] -> [...], float32 math."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
