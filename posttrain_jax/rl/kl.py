"""Per-token estimators of KL(pi_theta || pi_ref) from log-probs of sampled tokens.

With d = log pi_ref(y_t) - log pi_theta(y_t) and y_t sampled from pi_theta (Schulman, "Approximating
KL divergence", 2020; the names TRL and verl use):

    k1 = -d                 unbiased, can be negative (TRL RLOO's and verl's "kl" in the reward)
    k2 = d^2 / 2            biased, non-negative, its gradient is the KL's gradient (verl "mse")
    k3 = exp(d) - d - 1     unbiased, non-negative (DeepSeekMath's GRPO, TRL GRPO, verl "low_var_kl")

verl clamps d to [-20, 20] and k3 to [-10, 10] for stability; TRL does not, and neither do we
(the goldens use values where the clamps never act). `where`-masking of the inputs is the
caller's job (see `policy_loss.masked`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_PLACEMENTS = ("loss", "reward")


def kl_estimate(logps: jax.Array, ref_logps: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token KL estimate, float32, same shape as `logps` ([rows, length] usually).

    Args:
      logps: log pi_theta of the sampled tokens (any float dtype).
      ref_logps: log pi_ref of the same tokens.
      estimator: "k1" | "k2" | "k3" (see the module docstring).
    Raises:
      ValueError: an unknown estimator.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
    d = ref_logps.astype(jnp.float32) - logps.astype(jnp.float32)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return jnp.exp(d) - d - 1.0


def behaviour_gap(train_logps: jax.Array, behaviour_logps: jax.Array) -> dict[str, jax.Array]:
    """Per-token gap between the training forward and the sampler that produced the tokens.

    `abs_diff` = |log pi_train - log pi_behaviour| and `kl` = the k3 estimate of
    KL(pi_behaviour || pi_train) from tokens sampled by the behaviour policy
    (r = pi_train / pi_behaviour, kl = r - 1 - log r >= 0). Both float32, unmasked.
    """
    log_ratio = train_logps.astype(jnp.float32) - behaviour_logps.astype(jnp.float32)
    return {"abs_diff": jnp.abs(log_ratio), "kl": jnp.expm1(log_ratio) - log_ratio}
