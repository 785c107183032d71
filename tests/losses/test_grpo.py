"""GRPO losses against TRL 1.16 `GRPOTrainer` goldens (scripts/make_grpo_goldens.py), plus the
aggregation contract (split invariance), masking, gradients and errors."""

import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.losses.grpo import (
    TRL_LOSS_TYPES,
    group_advantages,
    grpo_denominator,
    grpo_metric_sums,
    grpo_token_loss,
    grpo_token_weights,
    nonzero_std_sample_mask,
    token_entropy,
)

RTOL = 1e-6  # float32; never loosened to make a test pass
GOLDENS = Path(__file__).parent / "goldens" / "grpo.json"
METRIC_TERMS = {"kl": "kl", "clip_ratio/low_mean": "is_low_clipped", "clip_ratio/high_mean": "is_high_clipped",
                "clip_ratio/region_mean": "is_region_clipped"}


@pytest.fixture(scope="module")
def goldens():
    return json.loads(GOLDENS.read_text())


def arrays(goldens):
    inputs = goldens["inputs"]
    return {k: jnp.asarray(inputs[k], jnp.float32)
            for k in ("logps", "old_logps", "ref_logps", "completion_mask", "advantages", "logits")}


def rel_err(ours, reference):
    ours, reference = float(ours), float(reference)
    return abs(ours - reference) / abs(reference)


def assert_rel(ours, reference, what, magnitude=0.0):
    """|ours - reference| <= RTOL * max(|reference|, magnitude).

    `magnitude` is sum(|loss * w|) / D, the size of the terms a loss adds up. Group advantages
    sum to zero, so some losses are mostly cancellation (on-policy `grpo` at beta 0 is
    -mean(A) over the completions, ~0): float32 summation in any order is then only exact to
    RTOL of the terms' size, not of the tiny result (TRL's own float32 result is 1.4e-6 off its
    float64 one there). For every other value magnitude is 0 or close to |reference|.
    """
    scale = max(abs(float(reference)), float(magnitude))
    err = abs(float(ours) - float(reference)) / scale
    assert err <= RTOL, (f"{what}: ours {float(ours)!r} vs reference {float(reference)!r}, error {err:.2e} "
                         f"relative to {scale:.3g} (relative to the reference: {rel_err(ours, reference):.2e})")


def aggregated(goldens, case, rows=slice(None)):
    """Our loss for a golden case: sum(loss * w) over `rows` / D of the whole batch, the token terms,
    and sum(|loss * w|) / D (see `assert_rel`)."""
    a = arrays(goldens)
    mask, aggregation = a["completion_mask"], TRL_LOSS_TYPES[case["loss_type"]]
    loss, terms = grpo_token_loss(
        a["logps"][rows], a["old_logps"][rows] if case["with_old"] else None, a["advantages"][rows], mask[rows],
        epsilon_low=case["epsilon"], epsilon_high=case["epsilon_high"], beta=case["beta"],
        ref_logps=a["ref_logps"][rows] if case["beta"] else None)
    weights = grpo_token_weights(mask[rows], aggregation)
    denominator = grpo_denominator(mask, aggregation, max_completion_length=goldens["inputs"]["max_completion_length"])
    return jnp.sum(loss * weights) / denominator, terms, jnp.sum(jnp.abs(loss * weights)) / denominator


def test_loss_and_metrics_match_trl(goldens):
    a = arrays(goldens)
    entropy_sums = grpo_metric_sums({"entropy": token_entropy(a["logits"])}, a["completion_mask"])
    worst = {"loss": 0.0, "loss_vs_float64": 0.0, "loss_vs_terms": 0.0, "metrics": 0.0}
    for case in goldens["cases"]:
        loss, terms, magnitude = aggregated(goldens, case)
        assert_rel(loss, case["loss"], case["name"], magnitude)
        worst["loss"] = max(worst["loss"], rel_err(loss, case["loss"]))
        worst["loss_vs_float64"] = max(worst["loss_vs_float64"], rel_err(loss, case["loss_float64"]))
        worst["loss_vs_terms"] = max(worst["loss_vs_terms"], abs(float(loss) - case["loss"]) / float(magnitude))
        sums = grpo_metric_sums(terms, a["completion_mask"])
        assert ("kl" in sums) == ("kl" in case["metrics"])
        for theirs, ours in METRIC_TERMS.items():
            if theirs not in case["metrics"]:
                continue
            mean, reference = float(sums[ours] / sums["num_tokens"]), case["metrics"][theirs]
            if reference == 0.0:  # nothing clipped on-policy
                assert mean == 0.0, (case["name"], theirs, mean)
                continue
            assert_rel(mean, reference, f"{case['name']} {theirs}")
            worst["metrics"] = max(worst["metrics"], rel_err(mean, reference))
        assert_rel(entropy_sums["entropy"] / entropy_sums["num_tokens"], case["metrics"]["entropy"], "entropy")
    print(f"GRPO vs TRL 1.16 ({len(goldens['cases'])} cases): max errors "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def test_token_entropy_matches_trl(goldens):
    ours = np.asarray(token_entropy(arrays(goldens)["logits"]))
    theirs = np.asarray(goldens["entropies"], np.float32)
    err = np.max(np.abs(ours - theirs) / np.abs(theirs))
    print(f"entropy vs trl entropy_from_logits: max relative error {err:.2e}")
    assert err <= RTOL


def test_advantages_match_trl(goldens):
    worst = 0.0
    for case in goldens["advantage_cases"]:
        reward_set = goldens["reward_sets"][case["rewards"]]
        rewards, group_size = jnp.asarray(reward_set["rewards"], jnp.float32), reward_set["group_size"]
        result = group_advantages(rewards, group_size, scale=case["scale_rewards"])
        ours, theirs = np.asarray(result.advantages), np.asarray(case["advantages"], np.float32)
        what = f"{case['rewards']} scale={case['scale_rewards']}"
        zero = theirs == 0
        np.testing.assert_array_equal(ours[zero], 0.0, err_msg=what)
        if (~zero).any():
            err = np.max(np.abs(ours[~zero] - theirs[~zero]) / np.abs(theirs[~zero]))
            worst = max(worst, err)
            assert err <= RTOL, f"{what}: relative error {err:.2e}"
        # TRL tests the batch std in "batch" mode; ours flags groups with equal rewards in every mode.
        if case["scale_rewards"] != "batch":
            np.testing.assert_array_equal(np.asarray(result.zero_std), case["is_std_zero"], err_msg=what)
            std = np.asarray(case["std_rewards"], np.float32)[::group_size]
            np.testing.assert_allclose(np.asarray(result.group_std), std, rtol=RTOL, atol=0, err_msg=what)
    print(f"advantages vs TRL 1.16 ({len(goldens['advantage_cases'])} cases): max relative error {worst:.2e}")


def test_advantage_options():
    rewards = jnp.asarray([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    ddof0 = group_advantages(rewards, 4, std_ddof=0, eps=0.0)
    first = np.array([1.0, 2.0, 3.0, 6.0])
    np.testing.assert_allclose(np.asarray(ddof0.advantages[:4]), (first - first.mean()) / first.std(), rtol=RTOL)
    np.testing.assert_array_equal(np.asarray(ddof0.zero_std), [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(nonzero_std_sample_mask(ddof0)), [1, 1, 1, 1, 0, 0, 0, 0])
    centred = group_advantages(rewards, 4, scale="none")
    np.testing.assert_allclose(np.asarray(centred.advantages), np.r_[first - 3.0, np.zeros(4)], rtol=RTOL)
    with pytest.raises(ValueError, match="unknown advantage scale 'std'"):
        group_advantages(rewards, 4, scale="std")
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(rewards, 3)


def test_split_into_micro_batches_matches_trl_accumulation(goldens):
    """sum over micro-batches of sum(loss * w) / D(global) = the one-batch loss = TRL's accumulated loss,
    for dapo / grpo / dr_grpo; TRL's bnpo (a per-micro-batch mean) is the one that changes with the split."""
    whole = {c["loss_type"]: c for c in goldens["cases"]
             if c["beta"] == 0.04 and c["epsilon_high"] == 0.28 and c["with_old"]}
    rows = len(goldens["inputs"]["logps"])
    for split in goldens["split_cases"]:
        parts = [aggregated(goldens, split, slice(i, i + rows // 4)) for i in range(0, rows, rows // 4)]
        ours, magnitude = sum(p[0] for p in parts), sum(p[2] for p in parts)
        one_batch = whole[split["loss_type"]]["loss"]
        assert_rel(ours, one_batch, f"{split['name']} 4 micro-batches vs TRL one batch", magnitude)
        if split["loss_type"] == "bnpo":
            assert rel_err(split["loss"], one_batch) > 1e-2
        else:
            assert_rel(ours, split["loss"], f"{split['name']} vs TRL 2 micro-batches", magnitude)


def test_completions_sharded_over_eight_devices(goldens):
    """The 16 completions sharded over the 8 fake devices, one jitted step: same losses as TRL's."""
    from jax.sharding import NamedSharding, PartitionSpec

    a = arrays(goldens)
    rows = NamedSharding(jax.make_mesh((8,), ("data",)), PartitionSpec("data"))
    keys = ("logps", "old_logps", "ref_logps", "advantages", "completion_mask")
    sharded = {k: jax.device_put(a[k], rows) for k in keys}

    @partial(jax.jit, static_argnames="aggregation")
    def step(x, aggregation):
        loss, _ = grpo_token_loss(x["logps"], x["old_logps"], x["advantages"], x["completion_mask"],
                                  epsilon_high=0.28, beta=0.04, ref_logps=x["ref_logps"])
        weights = grpo_token_weights(x["completion_mask"], aggregation)
        return jnp.sum(loss * weights) / grpo_denominator(x["completion_mask"], aggregation, max_completion_length=32)

    for case in goldens["cases"]:
        if case["beta"] == 0.04 and case["epsilon_high"] == 0.28 and case["with_old"]:
            value = step(sharded, TRL_LOSS_TYPES[case["loss_type"]])
            assert_rel(value, case["loss"], f"{case['name']} sharded", aggregated(goldens, case)[2])


def test_sample_mask_and_sequence_counting():
    mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], jnp.float32)
    keep = jnp.asarray([1, 1, 1, 0], jnp.float32)
    w = grpo_token_weights(mask, "sequence_mean", sample_mask=keep)
    np.testing.assert_allclose(np.asarray(w.sum(axis=1)), [1, 1, 0, 0])
    # TRL counts an all-masked completion (row 2) in the sequence and constant denominators.
    assert float(grpo_denominator(mask, "sequence_mean", sample_mask=keep)) == 3
    assert float(grpo_denominator(mask, "sequence_mean")) == 4
    assert float(grpo_denominator(mask, "constant", sample_mask=keep)) == 12
    assert float(grpo_denominator(mask, "constant", max_completion_length=10)) == 40
    assert float(grpo_denominator(mask, "token_mean", sample_mask=keep)) == 4
    np.testing.assert_array_equal(np.asarray(grpo_token_weights(mask, "constant", sample_mask=keep)),
                                  np.asarray(mask) * np.asarray(keep)[:, None])


def test_gradients_masked_and_on_policy(goldens):
    """-inf outside the mask gives finite, zero gradients there; on-policy at beta 0 the gradient of
    the sequence mean is exactly -A * w / D per token (the ratio is 1)."""
    a = arrays(goldens)
    mask = a["completion_mask"]
    logps = jnp.where(mask > 0, a["logps"], -jnp.inf)
    weights, denominator = grpo_token_weights(mask, "sequence_mean"), grpo_denominator(mask, "sequence_mean")

    @jax.jit
    def objective(logps, old_logps, ref_logps, beta):
        loss, _ = grpo_token_loss(logps, old_logps, a["advantages"], mask, beta=beta, ref_logps=ref_logps,
                                  epsilon_high=0.28)
        return jnp.sum(loss * weights) / denominator

    old = jnp.where(mask > 0, a["old_logps"], -jnp.inf)
    ref = jnp.where(mask > 0, a["ref_logps"], jnp.inf)
    value, grads = jax.value_and_grad(objective)(logps, old, ref, 0.04)
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grads)).all()
    assert not np.asarray(grads)[np.asarray(mask) == 0].any()
    case = next(c for c in goldens["cases"] if c["name"] == "grpo_beta0.04_eps0.2-0.28_old")
    assert_rel(value, case["loss"], "grpo with -inf padding", aggregated(goldens, case)[2])

    grads = jax.grad(lambda x: jnp.sum(grpo_token_loss(x, None, a["advantages"], mask)[0] * weights) / denominator)(
        logps)
    expected = -np.asarray(a["advantages"])[:, None] * np.asarray(weights) / float(denominator)
    np.testing.assert_allclose(np.asarray(grads), expected, rtol=RTOL, atol=0)


def test_kl_estimators():
    logps = jnp.asarray([[-1.0, -2.0, -0.5]])
    ref = jnp.asarray([[-1.5, -1.0, -0.5]])
    mask, adv = jnp.ones((1, 3)), jnp.zeros(1)
    d = np.asarray(ref - logps)
    expected = {"k1": -d, "k2": 0.5 * d ** 2, "k3": np.exp(d) - d - 1}
    for estimator, want in expected.items():
        loss, terms = grpo_token_loss(logps, None, adv, mask, beta=0.5, ref_logps=ref, kl_estimator=estimator)
        np.testing.assert_allclose(np.asarray(terms["kl"]), want, rtol=RTOL)
        np.testing.assert_allclose(np.asarray(loss), 0.5 * want, rtol=RTOL)  # A = 0: only the KL term
    with pytest.raises(ValueError, match="unknown kl_estimator 'k4'"):
        grpo_token_loss(logps, None, adv, mask, kl_estimator="k4")
    with pytest.raises(ValueError, match="pass ref_logps"):
        grpo_token_loss(logps, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="unknown GRPO loss aggregation 'dapo'"):
        grpo_token_weights(mask, "dapo")
    with pytest.raises(ValueError, match="unknown GRPO loss aggregation"):
        grpo_denominator(mask, "mean")


def test_float32_math_from_bfloat16_inputs(goldens):
    a = arrays(goldens)
    loss, terms = grpo_token_loss(a["logps"].astype(jnp.bfloat16), a["old_logps"].astype(jnp.bfloat16),
                                  a["advantages"], a["completion_mask"], beta=0.04,
                                  ref_logps=a["ref_logps"].astype(jnp.bfloat16))
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in terms.values())
    assert token_entropy(a["logits"].astype(jnp.bfloat16)).dtype == jnp.float32
