"""Advantage estimators: group (GRPO), rloo, reinforce_pp, gae.

Token-level arrays are [rows, length] float32 with a 0/1 completion `mask` (right-padded or
embedded in a prompt + completion row: only the mask matters). Rewards arrive as one scalar
score per completion; `outcome_token_rewards` puts it on the completion's last token (where a
reward model reads it), and a per-token KL penalty may be subtracted from every token
(`kl_in="reward"`) before the estimator runs.

- `group`: (R - mean_group) / (std_group + eps) per completion (`losses.grpo.group_advantages`, TRL GRPO).
- `rloo`: R - the mean of the other k - 1 of its group, optionally batch-normalised (TRL 1.16
  RLOOTrainer; verl `compute_rloo_outcome_advantage`).
- `reinforce_pp`: G_t = sum_{s>=t} gamma^(s-t) r_s, whitened over the batch (verl
  `compute_reinforce_plus_plus_outcome_advantage`).
- `gae`: GAE(gamma, lambda) over the completion with a critic's values (verl
  `compute_gae_advantage_return`).

Whitening is verl's `masked_whiten`: (x - mean) * rsqrt(var + 1e-8) with the unbiased (Bessel)
variance over the masked tokens of the whole (global) batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from posttrain_jax.losses.grpo import group_advantages

ESTIMATORS = ("group", "rloo", "reinforce_pp", "gae")
__all__ = ["ESTIMATORS", "group_advantages", "outcome_token_rewards", "masked_mean", "masked_whiten",
           "rloo_advantages", "discounted_returns", "reinforce_pp_advantages", "gae_advantages"]


def _mask(mask: jax.Array) -> jax.Array:
    return (mask > 0).astype(jnp.float32)


def outcome_token_rewards(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """[rows] scores -> [rows, length] float32 token rewards: the score on each row's last masked token.

    A row with an empty mask gets no reward anywhere.
    """
    m = _mask(mask)
    positions = jnp.arange(m.shape[1])
    last = jnp.max(jnp.where(m > 0, positions, -1), axis=1)
    return jnp.where(positions[None, :] == last[:, None], scores.astype(jnp.float32)[:, None], 0.0)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the mask, [] float32 (verl's masked_mean: sum / (count + 1e-8))."""
    m = _mask(mask)
    return jnp.sum(jnp.where(m > 0, values.astype(jnp.float32), 0.0)) / (m.sum() + 1e-8)


def masked_whiten(values: jax.Array, mask: jax.Array) -> jax.Array:
    """(x - mean) * rsqrt(var + 1e-8) over the mask, Bessel-corrected var (verl's masked_whiten).

    Values off the mask are whitened too (callers multiply by the mask); a mask with fewer than
    two tokens gives var 0 (verl raises there).
    """
    m = _mask(mask)
    values = values.astype(jnp.float32)
    mean = masked_mean(values, m)
    var = masked_mean(jnp.square(values - mean), m)
    count = m.sum()
    var = var * count / jnp.maximum(count - 1.0, 1.0)
    return (values - mean) * jax.lax.rsqrt(var + 1e-8)


def rloo_advantages(rewards: jax.Array, group_size: int, *, normalize: bool = False) -> jax.Array:
    """REINFORCE leave-one-out advantages [rows] float32 (Ahmadian et al. 2024).

    A_i = R_i - (sum_group - R_i) / (k - 1); with `normalize`, (A - mean(A)) / (std(A) + 1e-4) over
    the whole batch, std with ddof 1 (TRL's `normalize_advantages`).

    Args:
      rewards: [num_groups * group_size] sequence rewards, groups contiguous (already including a
        KL penalty if the KL is in the reward: TRL RLOO subtracts beta * sum_t k1_t).
      group_size: k >= 2.
    Raises:
      ValueError: group_size < 2 or rows not a multiple of it.
    """
    rewards = rewards.astype(jnp.float32)
    if group_size < 2 or rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rloo needs [num_groups * group_size] rewards with group_size >= 2; got shape "
                         f"{rewards.shape}, group_size={group_size}")
    grouped = rewards.reshape(-1, group_size)
    baseline = (grouped.sum(axis=1, keepdims=True) - grouped) / (group_size - 1)
    advantages = (grouped - baseline).reshape(-1)
    if normalize:
        centred = advantages - advantages.mean()
        std = jnp.sqrt(jnp.sum(centred * centred) / max(advantages.shape[0] - 1, 1))
        advantages = centred / (std + 1e-4)
    return advantages


def _reverse_scan(step, init, *xs):
    """Run `step(carry, (x_t, ...)) -> (carry, y_t)` from the last position to the first over axis 1."""
    columns = tuple(jnp.moveaxis(x, 1, 0) for x in xs)
    _, ys = jax.lax.scan(step, init, columns, reverse=True)
    return jnp.moveaxis(ys, 0, 1)


def discounted_returns(token_rewards: jax.Array, mask: jax.Array, *, gamma: float = 1.0) -> jax.Array:
    """G_t = r_t + gamma G_{t+1} over masked tokens, [rows, length] float32, 0 off the mask.

    Positions off the mask are skipped (the running return passes through them unchanged), as in
    verl's REINFORCE++.
    """
    m = _mask(mask)

    def step(running, x):
        r, mt = x
        new = r + gamma * running
        return new * mt + running * (1.0 - mt), new * mt

    return _reverse_scan(step, jnp.zeros(m.shape[0], jnp.float32), token_rewards.astype(jnp.float32), m)


def reinforce_pp_advantages(token_rewards: jax.Array, mask: jax.Array, *,
                            gamma: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """REINFORCE++ (Hu 2025): (advantages, returns), both [rows, length] float32, 0 off the mask.

    returns = `discounted_returns`; advantages = returns whitened over every masked token of the
    batch (`masked_whiten`). The KL penalty belongs in `token_rewards` (kl_in="reward").
    """
    m = _mask(mask)
    returns = discounted_returns(token_rewards, m, gamma=gamma)
    return masked_whiten(returns, m) * m, returns


def gae_advantages(token_rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float = 1.0,
                   lam: float = 0.95, whiten: bool = True) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016): (advantages, returns) [rows, length] float32.

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lambda A_{t+1};  returns = A + V,
    the recursion skipping positions off the mask (V and A pass through them) and V after the
    last token = 0, exactly verl's `compute_gae_advantage_return`. With `whiten`, advantages are
    `masked_whiten`ed over the batch (verl always whitens; TRL PPO's `whiten_rewards` is separate).

    Args:
      token_rewards: [rows, length] (score at the end token minus any per-token KL penalty).
      values: [rows, length] the critic's V(s_t) at each token's position (before the token).
      mask: [rows, length] 0/1 completion tokens.
    Returns:
      advantages (0 off the mask), returns (= A + V before whitening,
      the value targets; off the mask they are meaningless and masked by the value loss).
    """
    m = _mask(mask)
    rewards, values = token_rewards.astype(jnp.float32), values.astype(jnp.float32)
    rows = m.shape[0]

    def step(carry, x):
        next_value, last_gae = carry
        r, v, mt = x
        delta = r + gamma * next_value - v
        gae = delta + gamma * lam * last_gae
        next_value = v * mt + (1.0 - mt) * next_value
        last_gae = gae * mt + (1.0 - mt) * last_gae
        return (next_value, last_gae), last_gae

    zeros = jnp.zeros(rows, jnp.float32)
    advantages = _reverse_scan(step, (zeros, zeros), rewards, values, m)
    returns = advantages + values
    if whiten:
        advantages = masked_whiten(advantages, m)
    return advantages * m, returns
