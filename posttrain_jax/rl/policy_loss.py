"""Clipped policy-gradient losses with a token-level or a sequence-level importance ratio.

Per-token arrays are [rows, length] with a 0/1 `mask`; advantages are [rows] or [rows, length].
Every function returns the per-token loss (0 off the mask) and per-token float32 `terms` for
metrics; aggregation (weights and one global denominator) is `losses.grpo.grpo_token_weights`.

token (PPO, GRPO; DAPO's clip-higher with epsilon_high > epsilon_low):
    r_t  = exp(logp_t - old_logp_t)
    l_t  = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)
    dual-clip (Ye et al. 2019, verl's clip_ratio_c): where A_t < 0, l_t = min(l_t, -c A_t)

sequence (one ratio per completion, broadcast to its tokens; aggregate with "sequence_mean"):
    L_i  = sum_t (logp_t - old_logp_t) / |y_i|   ("mean": GSPO, Zheng et al. 2025; verl clamps L_i <= 10)
    L_i  = sum_t (logp_t - old_logp_t)           ("sum": TRL 1.16 RLOOTrainer's sequence log-ratio)
    s_i  = exp(L_i);  l_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)
  verl's token form: token t carries s_{i,t} = sg[s_i] * (pi_t / sg[pi_t])^c_i, equal to s_i in
  value, so "sequence_mean" aggregation (weights mask / |y_i|) gives mean_i l_i; c_i = 1 ("mean")
  gives GSPO's gradient, c_i = |y_i| ("sum") TRL RLOO's (s_i sum_t grad logp_t). A per-token TIS
  weight then scales each token's share, as in verl.

Truncated importance sampling (TIS; verl's rollout_is="token", TRL's vllm_importance_sampling_
correction): the loss of each token is multiplied by w_t = min(exp(old_logp_t - behaviour_logp_t),
cap), a constant (no gradient), where the behaviour log-probs are the sampler's. It corrects for
rollouts produced by other numerics (bf16 sampling) or older parameters (max_staleness > 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

POLICY_LOSSES = ("token", "sequence")
SEQUENCE_RATIOS = ("mean", "sum")


def masked(x: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 `x` with 0 off the mask. `where` on inputs: an inf off the mask must not make NaN gradients."""
    return jnp.where(mask > 0, x.astype(jnp.float32), 0.0)


def _advantages(advantages: jax.Array) -> jax.Array:
    advantages = advantages.astype(jnp.float32)
    return advantages[:, None] if advantages.ndim == 1 else advantages


def _clip_terms(ratio, advantages, epsilon_low, epsilon_high) -> dict[str, jax.Array]:
    is_low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
    is_high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
    f32 = jnp.float32
    return {"ratio": ratio, "is_low_clipped": is_low.astype(f32), "is_high_clipped": is_high.astype(f32),
            "is_region_clipped": (is_low | is_high).astype(f32)}


def truncated_is_weights(old_logps: jax.Array, behaviour_logps: jax.Array, mask: jax.Array, *,
                         cap: float) -> jax.Array:
    """TIS weights [rows, length] float32: min(exp(old - behaviour), cap) on the mask, 0 off it, no gradient.

    Args:
      old_logps: log-probs of the sampled tokens under the policy the update starts from (the
        training forward at the parameters before this step's updates).
      behaviour_logps: the sampler's log-probs of the same tokens (the policy that produced them).
      mask: 0/1 completion tokens.
      cap: the truncation threshold (verl's rollout_is_threshold, default 2; TRL's
        vllm_importance_sampling_cap, default 3); must be > 0.
    Raises:
      ValueError: cap <= 0.
    """
    if not cap > 0:
        raise ValueError(f"the truncated importance-sampling cap must be > 0, got {cap}")
    # verl clamps the log-ratio to +-20 before exp ("SAFETY_BOUND"); the cap acts long before.
    log_ratio = jnp.clip(masked(old_logps, mask) - masked(behaviour_logps, mask), -20.0, 20.0)
    weights = jnp.minimum(jnp.exp(log_ratio), cap)
    return jax.lax.stop_gradient(jnp.where(mask > 0, weights, 0.0))


def token_policy_loss(logps: jax.Array, old_logps: jax.Array | None, advantages: jax.Array, mask: jax.Array, *,
                      epsilon_low: float = 0.2, epsilon_high: float | None = None, clip_ratio_c: float | None = None,
                      is_weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token clipped surrogate (see the module docstring).

    Args:
      logps: [rows, length] log-probs of the sampled tokens under the policy being trained.
      old_logps: [rows, length] under the policy the update starts from, or None (one update per
        rollout: stop_gradient(logps), ratio exactly 1, as TRL does).
      advantages: [rows] or [rows, length].
      mask: [rows, length] 0/1 completion tokens; other positions give loss 0, gradient 0.
      epsilon_low, epsilon_high: clip range [1 - epsilon_low, 1 + epsilon_high] (None: = low).
      clip_ratio_c: dual-clip bound c > 1 for negative advantages (None: off; verl's default 3).
      is_weights: [rows, length] TIS weights (`truncated_is_weights`) or None.
    Returns:
      (loss [rows, length] float32, terms): `ratio`, `is_low_clipped` (r < 1 - eps_low, A < 0),
      `is_high_clipped` (r > 1 + eps_high, A > 0), `is_region_clipped`, and with dual-clip
      `is_dual_clipped` (A < 0 and -c A < the clipped loss), all float32, 0 off the mask.
    Raises:
      ValueError: clip_ratio_c <= 1.
    """
    logps = masked(logps, mask)
    old = jax.lax.stop_gradient(logps) if old_logps is None else masked(old_logps, mask)
    advantages = _advantages(advantages)
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    ratio = jnp.exp(logps - old)
    loss = -jnp.minimum(ratio * advantages, jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + eps_high) * advantages)
    terms = _clip_terms(ratio, advantages, epsilon_low, eps_high)
    if clip_ratio_c:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c={clip_ratio_c}: the dual-clip bound must be > 1")
        bound = -advantages * clip_ratio_c
        terms["is_dual_clipped"] = ((loss > bound) & (advantages < 0)).astype(jnp.float32)
        loss = jnp.where(advantages < 0, jnp.minimum(loss, bound), loss)
    if is_weights is not None:
        loss = loss * is_weights.astype(jnp.float32)
    valid = mask > 0
    return jnp.where(valid, loss, 0.0), {k: jnp.where(valid, v, 0.0) for k, v in terms.items()}


def sequence_policy_loss(logps: jax.Array, old_logps: jax.Array | None, advantages: jax.Array, mask: jax.Array, *,
                         epsilon_low: float = 3e-4, epsilon_high: float | None = 4e-4, ratio: str = "mean",
                         max_log_ratio: float | None = 10.0,
                         is_weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate with one ratio per completion (see the module docstring).

    Args:
      logps, old_logps, mask, is_weights: as in `token_policy_loss`.
      advantages: [rows], or [rows, length] (then the row's mean over the mask is used).
      epsilon_low, epsilon_high: clip range of the sequence ratio (GSPO: 3e-4 / 4e-4).
      ratio: "mean" (GSPO's length-normalised log-ratio) or "sum" (TRL RLOO's).
      max_log_ratio: clamp of the sequence log-ratio from above (verl's GSPO clamps at 10; None: off).
    Returns:
      (loss [rows, length] float32: the row's loss at each of its tokens (times its TIS weight),
      0 off the mask; terms as in `token_policy_loss`, each the row's value at its tokens).
      Aggregate with "sequence_mean" for mean_i l_i.
    Raises:
      ValueError: an unknown `ratio`.
    """
    if ratio not in SEQUENCE_RATIOS:
        raise ValueError(f"unknown sequence ratio {ratio!r}; choose one of {SEQUENCE_RATIOS}")
    logps = masked(logps, mask)
    old = jax.lax.stop_gradient(logps) if old_logps is None else masked(old_logps, mask)
    m = (mask > 0).astype(jnp.float32)
    tokens = jnp.maximum(m.sum(axis=1), 1.0)
    log_ratio = jnp.sum((logps - old) * m, axis=1)
    # Each token carries the row's ratio in value and its own log-prob's share of the gradient:
    # d log s_i = sum_t d logp_t / |y_i| ("mean") or sum_t d logp_t ("sum"); with the 1 / |y_i| of
    # "sequence_mean" aggregation, "sum" needs each token's part scaled by |y_i|.
    scale = jnp.ones_like(tokens) if ratio == "mean" else tokens
    if ratio == "mean":
        log_ratio = log_ratio / tokens
    own = scale[:, None] * (logps - jax.lax.stop_gradient(logps))
    log_ratio = own + jax.lax.stop_gradient(log_ratio)[:, None]
    if max_log_ratio is not None:
        log_ratio = jnp.minimum(log_ratio, max_log_ratio)
    advantages = _advantages(advantages)
    if advantages.shape[1] != 1:
        advantages = (jnp.sum(advantages * m, axis=1) / tokens)[:, None]
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    seq_ratio = jnp.exp(log_ratio)
    loss = -jnp.minimum(seq_ratio * advantages, jnp.clip(seq_ratio, 1.0 - epsilon_low, 1.0 + eps_high) * advantages)
    terms = _clip_terms(seq_ratio, jnp.broadcast_to(advantages, m.shape), epsilon_low, eps_high)
    if is_weights is not None:
        loss = loss * is_weights.astype(jnp.float32)
    valid = mask > 0
    return jnp.where(valid, loss, 0.0), {k: jnp.where(valid, v, 0.0) for k, v in terms.items()}
