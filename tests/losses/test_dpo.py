"""DPO-family losses against TRL 1.16 / 0.28 and open-instruct goldens, plus padding, packing and jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.losses.dpo import (
    batch_sequence_ids,
    chosen_nll_term,
    dpo_loss,
    dpo_metric_means,
    sequence_logps,
)

RTOL = 1e-6  # float32; never loosened to make a test pass
METRIC_KEYS = {"rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
               "rewards/margins": "rewards_margin", "rewards/accuracies": "rewards_accuracy",
               "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected"}


def assert_rel(ours, reference, what):
    ours, reference = float(ours), float(reference)
    assert abs(ours - reference) <= RTOL * abs(reference), (
        f"{what}: ours {ours!r} vs reference {reference!r}, relative error {abs(ours / reference - 1):.2e}")


def padded_layout(inputs):
    """TRL's rows [chosen 0..P-1, rejected 0..P-1] as (token_logps, loss_mask, sequence_ids)."""
    p = inputs["num_pairs"]
    attention = np.asarray(inputs["attention_mask"], np.int32)
    ids = np.concatenate([2 * np.arange(p) + 1, 2 * np.arange(p) + 2]).astype(np.int32)
    return (np.asarray(inputs["token_logps"], np.float32), np.asarray(inputs["completion_mask"], np.float32),
            attention * ids[:, None])


def pair_sequences(inputs):
    token_logps, loss_mask, sequence_ids = padded_layout(inputs)
    return sequence_logps(jnp.asarray(token_logps), jnp.asarray(loss_mask), jnp.asarray(sequence_ids),
                          inputs["num_pairs"])


def loss_kwargs(case, lengths):
    kwargs = {"beta": case["beta"], "label_smoothing": case.get("label_smoothing", 0.0),
              "chosen_lengths": lengths[0], "rejected_lengths": lengths[1]}
    if case["loss_type"] == "simpo":
        kwargs["gamma_beta_ratio"] = case["gamma_beta_ratio"]
    return kwargs


def token_cases(goldens):
    return [c for c in goldens["cases"] if c["inputs"] == "tokens"]


def check_metrics(case, metrics):
    means = dpo_metric_means(metrics)
    for theirs, ours in METRIC_KEYS.items():
        if theirs in case["metrics"]:
            assert_rel(means[ours], case["metrics"][theirs], f"{case['name']} {theirs}")


def test_goldens_cover_every_loss_type(dpo_goldens):
    kinds = {c["loss_type"] for c in dpo_goldens["cases"]}
    assert {"sigmoid", "robust", "hinge", "ipo", "dpo_norm", "simpo", "sft", "sigmoid+sft"} <= kinds
    assert dpo_goldens["meta"]["trl"] == "1.16.0" and dpo_goldens["meta"]["trl_legacy"] == "0.28.0"


@pytest.mark.parametrize("name", [
    "trl_sigmoid", "trl_robust", "trl_hinge", "trl_ipo", "trl_sigmoid_norm", "trl_sft", "trl_sigmoid_plus_0.2_sft",
    "open_instruct_dpo_norm", "open_instruct_dpo_norm_smoothed", "open_instruct_simpo",
    "open_instruct_simpo_smoothed"])
def test_from_token_logps_matches_reference(dpo_goldens, name):
    case = next(c for c in dpo_goldens["cases"] if c["name"] == name)
    inputs = dpo_goldens["inputs"]
    pc, pr, lc, lr = pair_sequences(inputs)
    rc, rr = jnp.asarray(inputs["ref_chosen_logps"]), jnp.asarray(inputs["ref_rejected_logps"])
    if case["loss_type"] == "sft":
        nll_sum, denominator = chosen_nll_term(pc, lc, normalization="token")
        assert_rel(nll_sum / denominator, case["loss"], name)
        return
    loss_type = "sigmoid" if case["loss_type"] == "sigmoid+sft" else case["loss_type"]
    loss_sum, metrics = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, **loss_kwargs(case, (lc, lr)))
    loss = loss_sum / metrics["num_pairs"]
    if case["loss_type"] == "sigmoid+sft":
        nll_sum, denominator = chosen_nll_term(pc, lc, normalization="token")
        loss = loss + case["loss_weights"][1] * nll_sum / denominator
    assert float(metrics["num_pairs"]) == inputs["num_pairs"]
    assert_rel(loss, case["loss"], name)
    assert_rel(loss, case["loss_float64"], f"{name} (float64 reference)")
    if name.startswith("open_instruct_dpo_norm"):
        return  # open-instruct logs per-token rewards for dpo_norm; we follow TRL (checked on trl_sigmoid_norm)
    check_metrics(case, metrics)


@pytest.mark.parametrize("name", ["trl0_sigmoid", "trl0_cdpo", "trl0_robust", "trl0_hinge", "trl0_ipo"])
def test_from_sequence_logps_matches_trl0(dpo_goldens, name):
    case = next(c for c in dpo_goldens["cases"] if c["name"] == name)
    s = {k: jnp.asarray(v, jnp.float32) for k, v in dpo_goldens["sequences"].items()}
    loss_sum, metrics = dpo_loss(s["policy_chosen"], s["policy_rejected"], s["ref_chosen"], s["ref_rejected"],
                                 loss_type=case["loss_type"],
                                 **loss_kwargs(case, (s["chosen_lengths"], s["rejected_lengths"])))
    assert_rel(loss_sum / metrics["num_pairs"], case["loss"], name)
    assert_rel(loss_sum / metrics["num_pairs"], case["loss_float64"], f"{name} (float64 reference)")
    check_metrics(case, metrics)


def test_sequence_logps_match_reference_sums(dpo_goldens):
    pc, pr, lc, lr = pair_sequences(dpo_goldens["inputs"])
    s = dpo_goldens["sequences"]
    np.testing.assert_allclose(np.asarray(pc), s["policy_chosen"], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(pr), s["policy_rejected"], rtol=RTOL)
    np.testing.assert_array_equal(np.asarray(lc), s["chosen_lengths"])
    np.testing.assert_array_equal(np.asarray(lr), s["rejected_lengths"])


def pack(inputs, row_length, seed=0):
    """The same 2P responses (prompt + completion) packed into rows of `row_length`, shuffled,
    so chosen and rejected of a pair may share a row or not."""
    token_logps, loss_mask, sequence_ids = padded_layout(inputs)
    order = np.random.default_rng(seed).permutation(len(token_logps))
    rows = [[]]
    for r in order:
        n = int((sequence_ids[r] > 0).sum())
        if sum(len(piece[0]) for piece in rows[-1]) + n > row_length:
            rows.append([])
        rows[-1].append((token_logps[r, :n], loss_mask[r, :n], sequence_ids[r, :n]))
    shape = (len(rows), row_length)
    # Padding positions hold -inf log-probs and a zero mask: they must not leak into any sum.
    out = (np.full(shape, -np.inf, np.float32), np.zeros(shape, np.float32), np.zeros(shape, np.int32))
    for i, pieces in enumerate(rows):
        at = 0
        for piece in pieces:
            for arr, values in zip(out, piece):
                arr[i, at:at + len(values)] = values
            at += len(piece[0])
    return out


def test_sequence_logps_packed_equals_padded(dpo_goldens):
    inputs = dpo_goldens["inputs"]
    padded = pair_sequences(inputs)
    token_logps, loss_mask, sequence_ids = pack(inputs, row_length=48)
    assert token_logps.shape[0] < 2 * inputs["num_pairs"]
    packed = sequence_logps(jnp.asarray(token_logps), jnp.asarray(loss_mask), jnp.asarray(sequence_ids),
                            inputs["num_pairs"])
    for a, b in zip(packed, padded):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL)
    case = next(c for c in dpo_goldens["cases"] if c["name"] == "trl_sigmoid")
    pc, pr, _, _ = packed
    loss_sum, metrics = dpo_loss(pc, pr, jnp.asarray(inputs["ref_chosen_logps"]),
                                 jnp.asarray(inputs["ref_rejected_logps"]), loss_type="sigmoid", beta=case["beta"])
    assert_rel(loss_sum / metrics["num_pairs"], case["loss"], "packed sigmoid")


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo", "dpo_norm", "simpo"])
def test_padding_pairs_contribute_nothing(dpo_goldens, loss_type):
    s = {k: np.asarray(v, np.float32) for k, v in dpo_goldens["sequences"].items()}
    pairs = len(s["policy_chosen"])
    kwargs = {"loss_type": loss_type, "beta": 0.1, "label_smoothing": 0.1 if loss_type != "hinge" else 0.0}
    real_sum, real_metrics = dpo_loss(*(jnp.asarray(s[k]) for k in (
        "policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")),
        chosen_lengths=jnp.asarray(s["chosen_lengths"]), rejected_lengths=jnp.asarray(s["rejected_lengths"]),
        **kwargs)
    # Interleave 5 padding pairs holding garbage (huge, nan, inf, zero lengths).
    garbage = np.array([1e30, np.nan, -np.inf, 7.0, 0.0], np.float32)
    at = np.array([0, 3, 3, 8, pairs])

    def padded(values, fill):
        return jnp.asarray(np.insert(values, at, fill))

    mask = padded(np.ones(pairs, np.float32), np.zeros(5, np.float32))
    pad_sum, pad_metrics = dpo_loss(
        padded(s["policy_chosen"], garbage), padded(s["policy_rejected"], garbage[::-1]),
        padded(s["ref_chosen"], garbage), padded(s["ref_rejected"], garbage),
        chosen_lengths=padded(s["chosen_lengths"], np.zeros(5, np.float32)),
        rejected_lengths=padded(s["rejected_lengths"], garbage), pair_mask=mask, **kwargs)
    assert float(pad_metrics["num_pairs"]) == pairs
    np.testing.assert_allclose(float(pad_sum), float(real_sum), rtol=RTOL)
    for key in real_metrics:
        np.testing.assert_allclose(float(pad_metrics[key]), float(real_metrics[key]), rtol=RTOL, err_msg=key)
    nll = chosen_nll_term(jnp.asarray(s["policy_chosen"]), jnp.asarray(s["chosen_lengths"]))
    pad_nll = chosen_nll_term(padded(s["policy_chosen"], garbage), padded(s["chosen_lengths"], garbage),
                              pair_mask=mask)
    np.testing.assert_allclose(np.asarray(pad_nll), np.asarray(nll), rtol=RTOL)


def test_sums_divided_by_count_are_the_per_pair_means(dpo_goldens):
    """Split the pairs over two micro-batches: summing the sums and dividing once = the one-batch mean."""
    s = {k: jnp.asarray(v, jnp.float32) for k, v in dpo_goldens["sequences"].items()}
    args = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")

    def run(index):
        return dpo_loss(*(s[k][index] for k in args), loss_type="dpo_norm", beta=5.0,
                        chosen_lengths=s["chosen_lengths"][index], rejected_lengths=s["rejected_lengths"][index])

    whole_sum, whole = run(slice(None))
    (a_sum, a), (b_sum, b) = run(slice(0, 5)), run(slice(5, None))
    assert_rel((a_sum + b_sum) / (a["num_pairs"] + b["num_pairs"]), whole_sum / whole["num_pairs"], "split loss")
    per_pair_mean = (-jax.nn.log_sigmoid(5.0 * (
        (s["policy_chosen"] - s["ref_chosen"]) / s["chosen_lengths"]
        - (s["policy_rejected"] - s["ref_rejected"]) / s["rejected_lengths"]))).mean()
    assert_rel(whole_sum / whole["num_pairs"], per_pair_mean, "mean")
    for key in whole:
        np.testing.assert_allclose(float(a[key] + b[key]), float(whole[key]), rtol=RTOL, err_msg=key)


def test_nll_sequence_normalization(dpo_goldens):
    s = {k: np.asarray(v, np.float64) for k, v in dpo_goldens["sequences"].items()}
    total, denominator = chosen_nll_term(jnp.asarray(s["policy_chosen"], jnp.float32),
                                         jnp.asarray(s["chosen_lengths"], jnp.float32), normalization="sequence")
    assert float(denominator) == len(s["policy_chosen"])
    assert_rel(total / denominator, np.mean(-s["policy_chosen"] / s["chosen_lengths"]), "sequence-mean NLL")


def test_jit_and_grad(dpo_goldens):
    inputs = dpo_goldens["inputs"]
    token_logps, loss_mask, sequence_ids = (jnp.asarray(a) for a in pack(inputs, row_length=64, seed=1))
    refs = jnp.asarray(inputs["ref_chosen_logps"]), jnp.asarray(inputs["ref_rejected_logps"])
    num_pairs = inputs["num_pairs"]

    def objective(token_logps, loss_type):
        pc, pr, lc, lr = sequence_logps(token_logps, loss_mask, sequence_ids, num_pairs)
        loss_sum, metrics = dpo_loss(pc, pr, *refs, loss_type=loss_type, beta=0.1, chosen_lengths=lc,
                                     rejected_lengths=lr, pair_mask=(lc > 0) & (lr > 0))
        nll_sum, tokens = chosen_nll_term(pc, lc)
        return loss_sum / metrics["num_pairs"] + 0.2 * nll_sum / tokens, metrics

    for loss_type in ("sigmoid", "robust", "hinge", "ipo", "dpo_norm", "simpo"):
        eager, _ = objective(token_logps, loss_type)
        step = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=1)
        (jitted, metrics), grads = step(token_logps, loss_type)
        np.testing.assert_allclose(float(jitted), float(eager), rtol=RTOL)
        assert float(metrics["num_pairs"]) == num_pairs
        assert np.isfinite(np.asarray(grads)).all()
        # Gradients only reach the tokens that are counted.
        assert not np.asarray(grads)[np.asarray(loss_mask) == 0].any()


def test_float32_math_from_bfloat16_inputs(dpo_goldens):
    s = {k: jnp.asarray(v, jnp.bfloat16) for k, v in dpo_goldens["sequences"].items()}
    loss_sum, metrics = dpo_loss(s["policy_chosen"], s["policy_rejected"], s["ref_chosen"], s["ref_rejected"],
                                 beta=0.1)
    assert loss_sum.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())


def test_aliases_and_errors(dpo_goldens):
    s = {k: jnp.asarray(v, jnp.float32) for k, v in dpo_goldens["sequences"].items()}
    args = (s["policy_chosen"], s["policy_rejected"], s["ref_chosen"], s["ref_rejected"])
    lengths = {"chosen_lengths": s["chosen_lengths"], "rejected_lengths": s["rejected_lengths"]}
    assert float(dpo_loss(*args, loss_type="dpo", beta=0.1)[0]) == float(dpo_loss(*args, beta=0.1)[0])
    assert (float(dpo_loss(*args, loss_type="sigmoid_norm", beta=5.0, **lengths)[0])
            == float(dpo_loss(*args, loss_type="dpo_norm", beta=5.0, **lengths)[0]))
    simpo = dpo_loss(s["policy_chosen"], s["policy_rejected"], None, None, loss_type="simpo", beta=2.0, **lengths)
    assert np.isfinite(float(simpo[0]))
    with pytest.raises(ValueError, match="unknown DPO loss_type 'kto'"):
        dpo_loss(*args, loss_type="kto", beta=0.1)
    with pytest.raises(ValueError, match="pass chosen_lengths"):
        dpo_loss(*args, loss_type="ipo", beta=0.1)
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        dpo_loss(*args, loss_type="robust", beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="needs the reference"):
        dpo_loss(s["policy_chosen"], s["policy_rejected"], None, None, beta=0.1)
    with pytest.raises(ValueError, match="unknown NLL normalization"):
        chosen_nll_term(s["policy_chosen"], s["chosen_lengths"], normalization="mean")


def test_goldens_are_plain_json_with_provenance(dpo_goldens):
    meta = dpo_goldens["meta"]
    assert meta["open_instruct_commit"] == "008fc86ddf7c2e1df8d27f1119b14407d3bc6a35"
    assert meta["torch"].startswith("2.13") and meta["generator"] == "scripts/make_preference_goldens.py"


def test_pairs_sharded_over_eight_devices(dpo_goldens):
    """12 real pairs padded to 16 slots and sharded over the 8 fake devices: same sums as one device."""
    from jax.sharding import NamedSharding, PartitionSpec

    s = {k: np.asarray(v, np.float32) for k, v in dpo_goldens["sequences"].items()}
    pairs = len(s["policy_chosen"])
    slots = 16
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))

    def slotted(values):
        return jax.device_put(np.pad(values, (0, slots - pairs)), sharding)

    keys = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "chosen_lengths", "rejected_lengths")
    sharded = [slotted(s[k]) for k in keys]
    pair_mask = slotted(np.ones(pairs, np.float32))

    @jax.jit
    def run(pc, pr, rc, rr, lc, lr, mask):
        return dpo_loss(pc, pr, rc, rr, loss_type="ipo", beta=0.1, chosen_lengths=lc, rejected_lengths=lr,
                        pair_mask=mask)

    loss_sum, metrics = run(*sharded, pair_mask)
    case = next(c for c in dpo_goldens["cases"] if c["name"] == "trl0_ipo")
    assert float(metrics["num_pairs"]) == pairs
    assert_rel(loss_sum / metrics["num_pairs"], case["loss"], "sharded ipo")


def test_per_row_pair_segment_ids(dpo_goldens):
    """The data pipeline's contract: whole pairs per row, segment ids 2k+1 / 2k+2 restarting in each row,
    per-pair arrays [rows, pairs_per_row]; one row has an empty pair slot."""
    inputs = dpo_goldens["inputs"]
    token_logps, loss_mask, sequence_ids = padded_layout(inputs)
    p, pairs_per_row = inputs["num_pairs"], 3
    layout = [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9, 10], [11]]  # pairs of each row
    rows, length = len(layout), 2 * pairs_per_row * token_logps.shape[1]
    out = (np.zeros((rows, length), np.float32), np.zeros((rows, length), np.float32),
           np.zeros((rows, length), np.int32))
    pair_mask = np.zeros((rows, pairs_per_row), np.float32)
    for r, pairs in enumerate(layout):
        at = 0
        for k, pair in enumerate(pairs):
            pair_mask[r, k] = 1
            for source_row, segment in ((pair, 2 * k + 1), (p + pair, 2 * k + 2)):
                n = int((sequence_ids[source_row] > 0).sum())
                out[0][r, at:at + n] = token_logps[source_row, :n]
                out[1][r, at:at + n] = loss_mask[source_row, :n]
                out[2][r, at:at + n] = segment
                at += n
    ids, num_pairs = batch_sequence_ids(jnp.asarray(out[2]), pairs_per_row)
    assert num_pairs == rows * pairs_per_row
    pc, pr, lc, lr = sequence_logps(jnp.asarray(out[0]), jnp.asarray(out[1]), ids, num_pairs)
    order = [pair for pairs in layout for pair in pairs]
    real = pair_mask.reshape(-1) > 0
    padded = [np.asarray(a) for a in pair_sequences(inputs)]
    for got, want in zip((pc, pr, lc, lr), padded):
        np.testing.assert_allclose(np.asarray(got)[real], want[order], rtol=RTOL)
        assert not np.asarray(got)[~real].any()
