"""PPO's clipped value loss and the critic's explained variance.

    v_clip = clip(v, v_old - c, v_old + c)
    l_t    = 0.5 * max((v - R)^2, (v_clip - R)^2)

as TRL's PPOTrainer and verl's `compute_value_loss` (token-mean aggregation: weight = mask, one
global denominator = tokens; verl multiplies by 0.5 after aggregating, the same thing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def clipped_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, *,
                       clip: float | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token clipped value loss [rows, length] float32 (0 off the mask) and terms.

    Args:
      values: [rows, length] the critic being trained.
      old_values: [rows, length] the critic's values when the rollout was scored (no gradient).
      returns: [rows, length] value targets (GAE returns).
      mask: [rows, length] 0/1 completion tokens.
      clip: the value clip range c (TRL cliprange_value, verl cliprange_value); None: no clipping.
    Returns:
      (loss, {"value_clipped": 1 where the clipped branch is larger (verl's vf_clipfrac),
      "value_error": (v - R)^2}) all float32, 0 off the mask.
    """
    valid = mask > 0
    v = jnp.where(valid, values.astype(jnp.float32), 0.0)
    old = jax.lax.stop_gradient(jnp.where(valid, old_values.astype(jnp.float32), 0.0))
    target = jax.lax.stop_gradient(jnp.where(valid, returns.astype(jnp.float32), 0.0))
    unclipped = jnp.square(v - target)
    if clip is None:
        loss, clipped_more = unclipped, jnp.zeros_like(unclipped)
    else:
        clipped = jnp.square(jnp.clip(v, old - clip, old + clip) - target)
        loss, clipped_more = jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32)
    terms = {"value_clipped": clipped_more, "value_error": unclipped}
    return jnp.where(valid, 0.5 * loss, 0.0), {k: jnp.where(valid, t, 0.0) for k, t in terms.items()}


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var(R - V) / (Var(R) + 1e-5) over the masked tokens, [] float32 (1: perfect, <= 0: no better
    than a constant). Unbiased variances, as verl's `critic/vf_explained_var` (metric_utils.py).
    """
    m = (mask > 0).astype(jnp.float32)
    count = m.sum()

    def var(x):
        x = jnp.where(m > 0, x.astype(jnp.float32), 0.0)
        mean = x.sum() / jnp.maximum(count, 1.0)
        return jnp.sum(jnp.where(m > 0, jnp.square(x - mean), 0.0)) / jnp.maximum(count - 1.0, 1.0)

    return 1.0 - var(returns - values) / (var(returns) + 1e-5)
