"""Hand-checkable properties of the RL pieces (the reference parity is in test_conformance.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.rl import advantages as adv
from posttrain_jax.rl.kl import behaviour_gap, kl_estimate
from posttrain_jax.rl.policy_loss import sequence_policy_loss, token_policy_loss, truncated_is_weights

MASK = jnp.asarray([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], jnp.float32)  # prompt + completion rows


def test_outcome_reward_sits_on_the_last_completion_token():
    rewards = np.asarray(adv.outcome_token_rewards(jnp.asarray([2.0, -1.0, 5.0]), MASK))
    np.testing.assert_array_equal(rewards, [[0, 0, 0, 2, 0], [0, 0, -1, 0, 0], [0, 0, 0, 0, 0]])


def test_gae_with_gamma_lambda_one_is_return_minus_value():
    values = jnp.asarray(np.random.default_rng(0).normal(size=MASK.shape), jnp.float32)
    rewards = adv.outcome_token_rewards(jnp.asarray([2.0, -1.0, 5.0]), MASK)
    advantages, returns = adv.gae_advantages(rewards, values, MASK, gamma=1.0, lam=1.0, whiten=False)
    m = np.asarray(MASK) > 0
    expected_returns = np.broadcast_to(np.asarray([2.0, -1.0, 0.0])[:, None], MASK.shape)
    np.testing.assert_allclose(np.asarray(returns)[m], expected_returns[m], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(advantages)[m], (expected_returns - np.asarray(values))[m], rtol=1e-6)
    assert not np.asarray(advantages)[~m].any()


def test_discounted_returns_and_whitening():
    rewards = adv.outcome_token_rewards(jnp.asarray([1.0, 1.0, 0.0]), MASK)
    returns = np.asarray(adv.discounted_returns(rewards, MASK, gamma=0.5))
    np.testing.assert_allclose(returns[0, 1:4], [0.25, 0.5, 1.0])
    white, _ = adv.reinforce_pp_advantages(rewards, MASK, gamma=0.5)
    m = np.asarray(MASK) > 0
    assert abs(np.asarray(white)[m].mean()) < 1e-6 and abs(np.asarray(white)[m].std(ddof=1) - 1) < 1e-3


def test_rloo_is_leave_one_out_and_errors():
    a = np.asarray(adv.rloo_advantages(jnp.asarray([1.0, 0.0, 0.0, 3.0]), 2))
    np.testing.assert_allclose(a, [1.0, -1.0, -3.0, 3.0])
    with pytest.raises(ValueError, match="group_size >= 2"):
        adv.rloo_advantages(jnp.ones(4), 1)


def test_on_policy_ratios_are_one_and_masked_positions_are_inert():
    logps = jnp.where(MASK > 0, -1.0, -jnp.inf)  # -inf off the mask must not leak
    advantages = jnp.asarray([1.0, -1.0, 0.5])
    for loss, terms in (token_policy_loss(logps, None, advantages, MASK),
                        sequence_policy_loss(logps, None, advantages, MASK)):
        assert np.isfinite(np.asarray(loss)).all()
        np.testing.assert_array_equal(np.asarray(terms["ratio"]), np.asarray(MASK))
    weights = truncated_is_weights(logps, logps - 5.0, MASK, cap=2.0)
    np.testing.assert_array_equal(np.asarray(weights), 2.0 * np.asarray(MASK))
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(logps, logps, MASK, cap=0.0)


def test_kl_estimators_and_the_behaviour_gap():
    logp, ref = jnp.asarray([-1.0, -2.0]), jnp.asarray([-1.5, -1.0])
    np.testing.assert_allclose(np.asarray(kl_estimate(logp, ref, "k1")), [0.5, -1.0])
    np.testing.assert_allclose(np.asarray(kl_estimate(logp, ref, "k2")), [0.125, 0.5])
    d = np.asarray(ref - logp)
    np.testing.assert_allclose(np.asarray(kl_estimate(logp, ref, "k3")), np.exp(d) - d - 1, rtol=1e-6)
    gap = behaviour_gap(logp, logp)
    assert float(gap["abs_diff"].sum()) == 0 and float(gap["kl"].sum()) == 0
    assert (np.asarray(behaviour_gap(logp, ref)["kl"]) > 0).all()
    with pytest.raises(ValueError, match="unknown kl_estimator 'k4'"):
        kl_estimate(logp, ref, "k4")
