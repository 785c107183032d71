"""RL estimators and losses against verl's core_algos (restated) and TRL 1.16's RLOOTrainer, on identical
inputs (goldens: scripts/make_rl_goldens.py), and five planted bugs that these checks must catch.

Each `check_*` takes the implementation as an argument, so the planted-bug test can hand it a
broken one and assert that the check fails.
"""

import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.losses.grpo import grpo_denominator, grpo_metric_sums, grpo_token_weights
from posttrain_jax.rl import advantages as adv
from posttrain_jax.rl import kl as kl_mod
from posttrain_jax.rl import policy_loss as pl
from posttrain_jax.rl import value_loss as vl

RTOL = 1e-6  # float32; never loosened to make a test pass
GOLDENS = Path(__file__).parent.parent / "losses" / "goldens" / "rl.json"
REAL = types.SimpleNamespace(adv=adv, kl=kl_mod, pl=pl, vl=vl)
ERRORS: list[float] = []  # every `close` of the running check (printed: the conformance errors)


@pytest.fixture(scope="module")
def goldens():
    return json.loads(GOLDENS.read_text())


def arr(goldens, key):
    return jnp.asarray(goldens["inputs"][key], jnp.float32)


def close(ours, theirs, what, *, scale=None):
    """max |ours - theirs| <= RTOL * scale; default scale max |theirs| (an array: its largest element).

    Aggregated losses pass `scale` = max(|loss|, the same aggregation of |per-token loss|): with
    advantages of mixed sign a loss is mostly cancellation, and float32 sums in any order are only
    exact to RTOL of the terms' size (as in tests/losses/test_grpo.py).
    """
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    scale = max(float(np.max(np.abs(theirs))), 1e-30) if scale is None else scale
    err = float(np.max(np.abs(ours - theirs))) / scale
    ERRORS.append(err)
    assert err <= RTOL, f"{what}: error {err:.2e} relative to {scale:.3g}"
    return err


def token_rewards(impl, goldens, kl_estimator, kl_coef):
    mask = arr(goldens, "mask")
    rewards = impl.adv.outcome_token_rewards(arr(goldens, "scores"), mask)
    if kl_coef:
        kl = impl.kl.kl_estimate(arr(goldens, "old_logps"), arr(goldens, "ref_logps"), kl_estimator)
        rewards = rewards - kl_coef * jnp.where(mask > 0, kl, 0.0)
    return rewards


# --------------------------------------------------------------------------- checks

def check_kl(impl, goldens):
    mask = np.asarray(goldens["inputs"]["mask"]) > 0
    for name, theirs in goldens["verl"]["kl"].items():
        ours = np.where(mask, impl.kl.kl_estimate(arr(goldens, "old_logps"), arr(goldens, "ref_logps"), name), 0.0)
        close(ours, theirs, f"kl {name}")


def check_gae(impl, goldens):
    mask = arr(goldens, "mask")
    for case in goldens["verl"]["gae"]:
        rewards = token_rewards(impl, goldens, case["kl_estimator"], case["kl_coef"])
        advantages, returns = impl.adv.gae_advantages(rewards, arr(goldens, "values"), mask, gamma=case["gamma"],
                                                      lam=case["lam"])
        m = np.asarray(mask) > 0
        what = f"gae gamma={case['gamma']} lam={case['lam']}"
        close(np.where(m, advantages, 0), np.where(m, case["advantages"], 0), what + " advantages")
        close(np.where(m, returns, 0), np.where(m, case["returns"], 0), what + " returns")


def check_reinforce_pp(impl, goldens):
    mask = arr(goldens, "mask")
    for case in goldens["verl"]["reinforce_pp"]:
        rewards = token_rewards(impl, goldens, case["kl_estimator"], case["kl_coef"])
        advantages, returns = impl.adv.reinforce_pp_advantages(rewards, mask, gamma=case["gamma"])
        close(advantages, case["advantages"], f"reinforce++ gamma={case['gamma']} advantages")
        close(returns, case["returns"], f"reinforce++ gamma={case['gamma']} returns")


def check_rloo(impl, goldens):
    mask = arr(goldens, "mask")
    group_size = goldens["inputs"]["group_size"]
    # verl: the leave-one-out score on every token of the row.
    ours = impl.adv.rloo_advantages(arr(goldens, "scores"), group_size)[:, None] * mask
    close(ours, goldens["verl"]["rloo"], "rloo vs verl")
    # TRL: the KL (k1, summed over the completion) in the reward, optional batch normalisation.
    for case in goldens["trl_rloo"]["advantages"]:
        rewards = token_rewards(impl, goldens, "k1", case["beta"])
        sequence = jnp.sum(rewards * mask, axis=1)
        ours = impl.adv.rloo_advantages(sequence, group_size, normalize=case["normalize"])
        close(ours, case["advantages"], f"rloo vs TRL beta={case['beta']} normalize={case['normalize']}")


def check_tis(impl, goldens):
    mask = arr(goldens, "mask")
    ours = impl.pl.truncated_is_weights(arr(goldens, "old_logps"), arr(goldens, "behaviour_logps"), mask, cap=2.0)
    close(ours, goldens["verl"]["tis_weights"], "truncated IS weights")
    assert float(jnp.max(ours)) == 2.0  # the golden inputs do hit the cap


def _aggregate(loss, mask, aggregation, sample_mask=None):
    weights = grpo_token_weights(mask, aggregation, sample_mask=sample_mask)
    return jnp.sum(loss * weights) / grpo_denominator(mask, aggregation, sample_mask=sample_mask)


def check_token_loss(impl, goldens):
    mask = arr(goldens, "mask")
    tis = jnp.asarray(goldens["verl"]["tis_weights"], jnp.float32)
    for case in goldens["verl"]["policy_vanilla"]:
        def loss_fn(logps):
            loss, terms = impl.pl.token_policy_loss(
                logps, arr(goldens, "old_logps"), arr(goldens, "token_advantages"), mask,
                epsilon_low=case["epsilon_low"], epsilon_high=case["epsilon_high"],
                clip_ratio_c=case["clip_ratio_c"], is_weights=tis if case["tis"] else None)
            return _aggregate(loss, mask, "token_mean"), (terms, _aggregate(jnp.abs(loss), mask, "token_mean"))

        (value, (terms, size)), grad = jax.value_and_grad(loss_fn, has_aux=True)(arr(goldens, "logps"))
        what = f"token loss eps={case['epsilon_low']}/{case['epsilon_high']} c={case['clip_ratio_c']} tis={case['tis']}"
        close(value, case["loss"], what, scale=max(abs(case["loss"]), float(size)))
        close(grad, case["grad"], what + " gradient")
        sums = grpo_metric_sums(terms, mask)
        # verl's pg_clipfrac counts tokens where the clipped branch is larger: A > 0 above, A < 0 below the range.
        close(sums["is_region_clipped"] / sums["num_tokens"], case["pg_clipfrac"], what + " clip fraction")
        close(sums["is_dual_clipped"] / sums["num_tokens"], case["pg_clipfrac_lower"], what + " dual-clip fraction",
              scale=1.0)


def check_sequence_loss(impl, goldens):
    mask = arr(goldens, "mask")
    tis = jnp.asarray(goldens["verl"]["tis_weights"], jnp.float32)
    for case in goldens["verl"]["policy_gspo"]:
        def loss_fn(logps):
            loss, _ = impl.pl.sequence_policy_loss(
                logps, arr(goldens, "old_logps"), arr(goldens, "row_advantages"), mask, ratio="mean",
                epsilon_low=case["epsilon_low"], epsilon_high=case["epsilon_high"],
                is_weights=tis if case["tis"] else None)
            return _aggregate(loss, mask, "sequence_mean"), _aggregate(jnp.abs(loss), mask, "sequence_mean")

        (value, size), grad = jax.value_and_grad(loss_fn, has_aux=True)(arr(goldens, "logps"))
        what = f"GSPO eps={case['epsilon_low']}/{case['epsilon_high']} tis={case['tis']}"
        close(value, case["loss"], what, scale=max(abs(case["loss"]), float(size)))
        close(grad, case["grad"], what + " gradient")
    for case in goldens["trl_rloo"]["losses"]:
        advantages = jnp.asarray(goldens["trl_rloo"]["advantages"][1]["advantages"], jnp.float32)

        def loss_fn(logps):
            loss, terms = impl.pl.sequence_policy_loss(
                logps, arr(goldens, "old_logps"), advantages, mask, ratio="sum", max_log_ratio=None,
                epsilon_low=case["epsilon"], epsilon_high=case["epsilon_high"])
            return _aggregate(loss, mask, "sequence_mean"), (terms, _aggregate(jnp.abs(loss), mask, "sequence_mean"))

        (value, (terms, size)), grad = jax.value_and_grad(loss_fn, has_aux=True)(arr(goldens, "logps"))
        what = f"RLOO (TRL) eps={case['epsilon']}/{case['epsilon_high']}"
        close(value, case["loss"], what, scale=max(abs(case["loss"]), float(size)))
        close(grad, case["grad"], what + " gradient")
        # TRL logs per-sequence clip fractions; ours are per token, so compare one value per row.
        first = np.asarray(terms["is_region_clipped"])[:, 0]
        close(first.mean(), case["clip_ratio/region_mean"], what + " clip fraction", scale=1.0)


def check_value_loss(impl, goldens):
    mask = arr(goldens, "mask")
    for case in goldens["verl"]["value"]:
        def loss_fn(values):
            loss, terms = impl.vl.clipped_value_loss(values, arr(goldens, "old_values"), arr(goldens, "returns"),
                                                     mask, clip=case["cliprange_value"])
            return jnp.sum(loss * mask) / mask.sum(), terms

        (value, terms), grad = jax.value_and_grad(loss_fn, has_aux=True)(arr(goldens, "values"))
        what = f"value loss clip={case['cliprange_value']}"
        close(value, case["loss"], what)
        close(grad, case["grad"], what + " gradient")
        close(jnp.sum(terms["value_clipped"]) / mask.sum(), case["clipfrac"], what + " clip fraction", scale=1.0)
    ev = impl.vl.explained_variance(arr(goldens, "values"), arr(goldens, "returns"), mask)
    close(ev, goldens["verl"]["explained_variance"], "explained variance", scale=1.0)


CHECKS = [check_kl, check_gae, check_reinforce_pp, check_rloo, check_tis, check_token_loss, check_sequence_loss,
          check_value_loss]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_matches_references(check, goldens):
    ERRORS.clear()
    check(REAL, goldens)
    print(f"{check.__name__.removeprefix('check_')}: {len(ERRORS)} comparisons, max error {max(ERRORS):.1e}")


def test_float64_references_agree(goldens):
    """The float32 references are within 1e-5 of float64 on the same inputs (the goldens are sound)."""
    for key in ("gae", "reinforce_pp"):
        for a, b in zip(goldens["verl"][key], goldens["verl_float64"][key]):
            np.testing.assert_allclose(a["advantages"], b["advantages"], rtol=0, atol=1e-4)
    for a, b in zip(goldens["trl_rloo"]["losses"], goldens["trl_rloo_float64"]["losses"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(abs(b["loss"]), 1.0)


# --------------------------------------------------------------------------- planted bugs

def _bug_gae_ignores_mask(token_rewards, values, mask, *, gamma=1.0, lam=0.95, whiten=True):
    # Bootstraps from the (garbage) value after the last token instead of 0.
    return adv.gae_advantages(token_rewards, values, jnp.ones_like(mask), gamma=gamma, lam=lam, whiten=whiten)


def _bug_rloo_includes_self(rewards, group_size, *, normalize=False):
    grouped = rewards.reshape(-1, group_size)
    return (grouped - grouped.mean(axis=1, keepdims=True)).reshape(-1)


def _bug_whiten_biased(values, mask):
    m = (mask > 0).astype(jnp.float32)
    mean = adv.masked_mean(values, m)
    return (values - mean) * jax.lax.rsqrt(adv.masked_mean(jnp.square(values - mean), m) + 1e-8)


def _bug_k3_sign(logps, ref_logps, estimator="k3"):
    d = logps.astype(jnp.float32) - ref_logps.astype(jnp.float32)  # flipped: KL(ref || pi) samples
    return jnp.exp(d) - d - 1.0 if estimator == "k3" else kl_mod.kl_estimate(logps, ref_logps, estimator)


def _bug_tis_uncapped(old_logps, behaviour_logps, mask, *, cap):
    return pl.truncated_is_weights(old_logps, behaviour_logps, mask, cap=1e9)


def _bug_gspo_sum(logps, old_logps, advantages, mask, *, ratio="mean", **kw):
    return pl.sequence_policy_loss(logps, old_logps, advantages, mask, ratio="sum", **kw)


def _bug_value_min(values, old_values, returns, mask, *, clip):
    v, old, r = values, jax.lax.stop_gradient(old_values), jax.lax.stop_gradient(returns)
    loss = jnp.minimum(jnp.square(v - r), jnp.square(jnp.clip(v, old - clip, old + clip) - r))
    return jnp.where(mask > 0, 0.5 * loss, 0.0), {"value_clipped": jnp.zeros_like(v), "value_error": loss}


def _patched(**overrides):
    parts = {"adv": adv, "kl": kl_mod, "pl": pl, "vl": vl}
    out = {}
    for name, module in parts.items():
        ns = types.SimpleNamespace(**{k: getattr(module, k) for k in dir(module) if not k.startswith("_")})
        for key, fn in overrides.get(name, {}).items():
            setattr(ns, key, fn)
        out[name] = ns
    return types.SimpleNamespace(**out)


def _whiten_bug():
    def gae(token_rewards, values, mask, *, gamma=1.0, lam=0.95, whiten=True):
        a, r = adv.gae_advantages(token_rewards, values, mask, gamma=gamma, lam=lam, whiten=False)
        return _bug_whiten_biased(a, mask) * mask, r

    def rpp(token_rewards, mask, *, gamma=1.0):
        r = adv.discounted_returns(token_rewards, mask, gamma=gamma)
        return _bug_whiten_biased(r, mask) * mask, r

    return {"adv": {"gae_advantages": gae, "reinforce_pp_advantages": rpp}}


PLANTED = {
    "gae bootstraps past the end": ({"adv": {"gae_advantages": _bug_gae_ignores_mask}}, check_gae),
    "rloo baseline includes the sample itself": ({"adv": {"rloo_advantages": _bug_rloo_includes_self}}, check_rloo),
    "whitening with the biased variance": (_whiten_bug(), check_reinforce_pp),
    "k3 with the KL direction flipped": ({"kl": {"kl_estimate": _bug_k3_sign}}, check_kl),
    "TIS without the cap": ({"pl": {"truncated_is_weights": _bug_tis_uncapped}}, check_tis),
    "GSPO ratio summed, not length-normalised": ({"pl": {"sequence_policy_loss": _bug_gspo_sum}},
                                                 check_sequence_loss),
    "value loss clipped with min instead of max": ({"vl": {"clipped_value_loss": _bug_value_min}}, check_value_loss),
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_bug_fails_its_check(name, goldens):
    overrides, check = PLANTED[name]
    with pytest.raises(AssertionError):
        check(_patched(**overrides), goldens)
