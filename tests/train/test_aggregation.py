"""Tülu 3 loss aggregation, made exact: gradients invariant to how a global batch is split.

A split is (data-parallel devices) x (accumulation steps) x (micro-batch rows per device);
the global batch is always the same 8 rows, of very different lengths and packings.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from posttrain_jax.ablation import gradient_for_split, max_relative_difference
from posttrain_jax.models import create_model, preset

SPLITS = [(1, 8, 1), (8, 1, 1), (2, 2, 2), (1, 1, 8), (4, 2, 1)]
CONFIG = preset("tiny-llama")
ROWS, LENGTH = 8, 48


def global_batch(seed=0):
    """8 rows: padded single examples of lengths 2..48 and packed rows of 2-4 examples."""
    rng = np.random.RandomState(seed)
    layouts = [[3], [48], [10], [5, 30, 9], [2], [20, 20], [7, 1, 25, 11], [40]]
    keys = ("tokens", "targets", "loss_mask", "positions", "segment_ids")
    batch = {k: np.zeros((ROWS, LENGTH), np.int32) for k in keys}
    for r, lengths in enumerate(layouts):
        at = 0
        for seg, n in enumerate(lengths, 1):
            ids = rng.randint(3, CONFIG.vocab_size, n + 1)
            sl = slice(at, at + n)
            batch["tokens"][r, sl], batch["targets"][r, sl] = ids[:-1], ids[1:]
            batch["loss_mask"][r, sl] = rng.rand(n) < 0.7  # like masked prompts
            batch["loss_mask"][r, at + n - 1] = 1  # every sequence has a loss token
            batch["positions"][r, sl], batch["segment_ids"][r, sl] = np.arange(n), seg
            at += n
    return batch


def grads_for(aggregation, split, params_seed=0):
    return gradient_for_split(CONFIG, global_batch(), aggregation, split, seed=params_seed)


max_rel_diff = max_relative_difference


@pytest.mark.parametrize("aggregation", ["sum", "token_mean", "sequence_mean"])
def test_gradient_is_invariant_to_the_split(aggregation):
    reference, ref_metrics = grads_for(aggregation, SPLITS[0])
    for split in SPLITS[1:]:
        grads, metrics = grads_for(aggregation, split)
        err = max_rel_diff(grads, reference)
        print(f"{aggregation} split {split} vs {SPLITS[0]}: max rel grad diff {err:.2e}")
        assert err < 2e-5, (aggregation, split, err)
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)


def test_mean_per_microbatch_depends_on_the_split():
    """The legacy mode averages per device-local micro-batch: it changes with the micro-batch size
    (and is the same for splits whose micro-batches hold the same rows)."""
    reference, _ = grads_for("mean_per_microbatch", SPLITS[0])  # 1 row per micro-batch
    for split in SPLITS[1:]:
        diff = max_rel_diff(grads_for("mean_per_microbatch", split)[0], reference)
        print(f"mean_per_microbatch split {split} vs {SPLITS[0]}: max rel grad diff {diff:.2e}")
        if split[2] == 1:
            assert diff < 2e-5, split
        else:
            assert diff > 1e-2, split


def test_one_micro_batch_one_device_agrees_across_modes_as_defined():
    """On one device and one micro-batch, token_mean == mean_per_microbatch."""
    a, _ = grads_for("token_mean", (1, 1, 8))
    b, _ = grads_for("mean_per_microbatch", (1, 1, 8))
    assert max_rel_diff(a, b) < 2e-5  # same math, fp32 operations in another order


def test_sequence_mean_and_sum_values():
    batch = global_batch()
    model = create_model(CONFIG, seed=0)
    hidden_logits = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                          jnp.asarray(batch["segment_ids"]))
    logp = jax.nn.log_softmax(np.asarray(hidden_logits, np.float64), -1)
    nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"].astype(np.float64)
    per_seq = [nll[r][(batch["segment_ids"][r] == s)] @ mask[r][batch["segment_ids"][r] == s] /
               mask[r][batch["segment_ids"][r] == s].sum()
               for r in range(ROWS) for s in set(batch["segment_ids"][r]) - {0}]
    _, metrics = grads_for("sequence_mean", (1, 1, 8))
    np.testing.assert_allclose(metrics["loss"], np.mean(per_seq), rtol=1e-5)
    _, metrics = grads_for("sum", (2, 2, 2))
    np.testing.assert_allclose(metrics["loss"], (nll * mask).sum() / ROWS, rtol=1e-5)


def test_token_mean_equals_transformers_num_items_in_batch():
    """Each micro-batch's transformers loss with the global num_items_in_batch sums to our token_mean."""
    batch = global_batch()
    model = create_model(CONFIG, seed=0)
    logits = np.asarray(model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                              jnp.asarray(batch["segment_ids"])))
    # transformers shifts labels itself: label[t+1] is what logits[t] predicts.
    labels = np.full((ROWS, LENGTH + 1), -100, np.int64)
    labels[:, 1:] = np.where(batch["loss_mask"] > 0, batch["targets"], -100)
    logits_ext = np.concatenate([logits, np.zeros((ROWS, 1, logits.shape[-1]), np.float32)], 1)
    num_items = int(batch["loss_mask"].sum())
    hf_total = sum(float(ForCausalLMLoss(torch.tensor(logits_ext[r:r + 2]), torch.tensor(labels[r:r + 2]),
                                         CONFIG.vocab_size, num_items_in_batch=torch.tensor(num_items)))
                   for r in range(0, ROWS, 2))  # four micro-batches of two rows
    _, metrics = grads_for("token_mean", (2, 2, 2))
    print(f"token_mean {metrics['loss']:.8f} vs transformers {hf_total:.8f}")
    assert abs(metrics["loss"] - hf_total) < 1e-5 * abs(hf_total)


def test_bfloat16_compute_keeps_float32_master_gradients():
    """bf16 activations, fp32 master weights: fp32 gradients close to the all-fp32 ones."""
    low, _ = gradient_for_split(CONFIG.replace(dtype="bfloat16"), global_batch(), "token_mean", (2, 2, 2))
    high, _ = grads_for("token_mean", (2, 2, 2))
    assert all(g.dtype == np.float32 for g in low)
    # A bound for bf16 rounding of activations (8 mantissa bits), not a parity tolerance.
    assert max_rel_diff(low, high) < 0.1
