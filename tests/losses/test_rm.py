"""Bradley-Terry reward loss against TRL 1.16's RewardTrainer goldens; padding; last-token pooling; jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.losses.rm import bradley_terry_loss, reward_metric_means, sequence_rewards

RTOL = 1e-6  # float32; never loosened to make a test pass


def assert_rel(ours, reference, what):
    ours, reference = float(ours), float(reference)
    assert abs(ours - reference) <= RTOL * abs(reference), (
        f"{what}: ours {ours!r} vs reference {reference!r}, relative error {abs(ours / reference - 1):.2e}")


def rm_arrays(goldens):
    inputs = goldens["inputs"]
    return (jnp.asarray(inputs["chosen_rewards"], jnp.float32), jnp.asarray(inputs["rejected_rewards"], jnp.float32),
            jnp.asarray(inputs["margin"], jnp.float32))


@pytest.mark.parametrize("name", ["trl_rm", "trl_rm_margin", "trl_rm_center", "trl_rm_margin_center"])
def test_bradley_terry_matches_trl(rm_goldens, name):
    case = next(c for c in rm_goldens["cases"] if c["name"] == name)
    chosen, rejected, margin = rm_arrays(rm_goldens)
    loss_sum, sums = bradley_terry_loss(chosen, rejected, margin=margin if case["margin"] else None,
                                        center_coef=case["center_rewards_coefficient"] or 0.0)
    assert float(sums["num_pairs"]) == rm_goldens["inputs"]["num_pairs"]
    assert_rel(loss_sum / sums["num_pairs"], case["loss"], name)
    assert_rel(loss_sum / sums["num_pairs"], case["loss_float64"], f"{name} (float64 reference)")
    means = reward_metric_means(sums)
    assert_rel(means["accuracy"], case["metrics"]["accuracy"], f"{name} accuracy")
    assert_rel(means["margin"], case["metrics"]["margin"], f"{name} margin")
    assert_rel(means["reward_mean"], case["metrics"]["mean_reward"], f"{name} mean_reward")


def test_reward_std_and_parts(rm_goldens):
    chosen, rejected, margin = rm_arrays(rm_goldens)
    loss_sum, sums = bradley_terry_loss(chosen, rejected, margin=margin, center_coef=0.01)
    both = np.concatenate([np.asarray(chosen), np.asarray(rejected)]).astype(np.float64)
    assert_rel(reward_metric_means(sums)["reward_std"], both.std(), "reward std")
    assert_rel(sums["bt_loss"] + 0.01 * sums["center_loss"], loss_sum, "parts add up")
    assert_rel(sums["rewards_chosen"] - sums["rewards_rejected"], sums["margin"], "margin sum")


@pytest.mark.parametrize("use_margin,center_coef", [(False, 0.0), (True, 0.01)])
def test_padding_pairs_contribute_nothing(rm_goldens, use_margin, center_coef):
    chosen, rejected, margin = (np.asarray(a) for a in rm_arrays(rm_goldens))
    pairs = len(chosen)
    real_sum, real = bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected),
                                        margin=jnp.asarray(margin) if use_margin else None, center_coef=center_coef)
    at = np.array([0, 4, 4, pairs])
    garbage = np.array([1e30, np.nan, -np.inf, 3.0], np.float32)
    pad_sum, padded = bradley_terry_loss(
        jnp.asarray(np.insert(chosen, at, garbage)), jnp.asarray(np.insert(rejected, at, garbage[::-1])),
        margin=jnp.asarray(np.insert(margin, at, garbage)) if use_margin else None, center_coef=center_coef,
        pair_mask=jnp.asarray(np.insert(np.ones(pairs, np.float32), at, 0.0)))
    np.testing.assert_allclose(float(pad_sum), float(real_sum), rtol=RTOL)
    for key in real:
        np.testing.assert_allclose(float(padded[key]), float(real[key]), rtol=RTOL, err_msg=key)


def test_sums_divided_by_count_are_the_per_pair_means(rm_goldens):
    chosen, rejected, margin = rm_arrays(rm_goldens)
    whole_sum, whole = bradley_terry_loss(chosen, rejected, margin=margin, center_coef=0.01)
    a_sum, a = bradley_terry_loss(chosen[:7], rejected[:7], margin=margin[:7], center_coef=0.01)
    b_sum, b = bradley_terry_loss(chosen[7:], rejected[7:], margin=margin[7:], center_coef=0.01)
    assert_rel((a_sum + b_sum) / (a["num_pairs"] + b["num_pairs"]), whole_sum / whole["num_pairs"], "split")
    for key in whole:
        np.testing.assert_allclose(float(a[key] + b[key]), float(whole[key]), rtol=RTOL, err_msg=key)


def packed_scores(seed=0, num_pairs=5, rows=3, length=16):
    """Random per-token scores with packed sequences; pair 3 is absent (a padding pair slot)."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(rows, length)).astype(np.float32)
    ids = np.zeros((rows, length), np.int32)
    layout = [[(1, 4), (2, 3), (5, 6)], [(6, 2), (4, 5), (9, 4)], [(10, 7), (3, 3)]]  # (sequence id, tokens)
    expected = {}
    for r, pieces in enumerate(layout):
        at = 0
        for sid, n in pieces:
            ids[r, at:at + n] = sid
            expected[sid] = scores[r, at + n - 1]
            at += n
    return scores, ids, expected, num_pairs


def test_sequence_rewards_reads_each_last_token():
    scores, ids, expected, num_pairs = packed_scores()
    chosen, rejected, pair_mask = sequence_rewards(jnp.asarray(scores), jnp.asarray(ids), num_pairs)
    for p in range(num_pairs):
        assert float(chosen[p]) == float(expected.get(2 * p + 1, 0.0))
        assert float(rejected[p]) == float(expected.get(2 * p + 2, 0.0))
    np.testing.assert_array_equal(np.asarray(pair_mask), [1, 1, 1, 0, 1])


def test_rm_objective_jits_and_padding_gets_no_gradient():
    scores, ids, _, num_pairs = packed_scores()

    def objective(scores):
        chosen, rejected, pair_mask = sequence_rewards(scores, ids, num_pairs)
        loss_sum, sums = bradley_terry_loss(chosen, rejected, pair_mask=pair_mask, center_coef=0.01)
        return loss_sum / sums["num_pairs"], sums

    (loss, sums), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(jnp.asarray(scores))
    eager, _ = objective(jnp.asarray(scores))
    np.testing.assert_allclose(float(loss), float(eager), rtol=RTOL)
    assert float(sums["num_pairs"]) == 4
    grads = np.asarray(grads)
    # Only the last token of each response gets a gradient (pair 3, ids 7 and 8, is absent).
    last_of_real = {(0, 3), (0, 6), (0, 12), (1, 1), (1, 6), (1, 10), (2, 6), (2, 9)}
    nonzero = {tuple(i) for i in np.argwhere(grads != 0)}
    assert nonzero == last_of_real
