"""The one-pass weighted log-prob sum (gradient taken in the forward pass) against autodiff of the unfused
path: values and gradients, a frozen kernel, the 8-device layouts, and the SFT objective's two passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from posttrain_jax.losses.logprob_sum import fused_logprob_sum
from posttrain_jax.models import create_model
from posttrain_jax.models.config import preset
from posttrain_jax.sharding import DEFAULT_RULES, logical_rules, logical_to_spec
from posttrain_jax.trainers.sft_objective import make_sft_objective
from tests.losses.test_logprobs import TOL, _close, _inputs, _unfused


def _reference(h, w, t, weights, **numerics):
    def f(h, w):
        logps = _unfused(h, w, t, **numerics)[0]
        return jnp.sum(weights * logps), logps
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w)


@pytest.mark.parametrize("vocab_major,softcap,temperature,chunk_size", [
    (True, None, 1.0, None), (False, None, 0.7, 5), (True, 3.0, 0.7, 4), (False, 3.0, 1.0, 64)],
    ids=["tied-one-chunk", "untied-temperature-padded-chunks", "tied-softcap-temperature", "untied-softcap"])
def test_values_and_gradients_match_unfused(vocab_major, softcap, temperature, chunk_size):
    h, w, t, weights = _inputs(vocab_major)
    numerics = dict(vocab_major=vocab_major, softcap=softcap, temperature=temperature)
    (ref_total, ref_logps), ref_grads = _reference(h, w, t, weights[0], **numerics)

    def ours(h, w):
        return fused_logprob_sum(h, w, t, weights[0], chunk_size=chunk_size, **numerics)

    (total, logps), grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(h, w)
    _close("total", total, ref_total, tol=TOL * max(1.0, float(abs(ref_total))))
    _close("logps", logps, ref_logps)
    _close("d hidden", grads[0], ref_grads[0])
    _close("d kernel", grads[1], ref_grads[1])
    # Not differentiated: the same values; a frozen kernel: the same d hidden (its matmul is skipped).
    _close("primal total", jax.jit(ours)(h, w)[0], ref_total, tol=TOL * max(1.0, float(abs(ref_total))))
    frozen = jax.jit(jax.grad(lambda h: ours(h, w)[0]))(h)
    _close("d hidden, frozen kernel", frozen, ref_grads[0])
    # The cotangent of the total scales both gradients.
    scaled = jax.jit(jax.grad(lambda h, w: -2.5 * ours(h, w)[0], argnums=(0, 1)))(h, w)
    _close("scaled d kernel", scaled[1], -2.5 * ref_grads[1], tol=3 * TOL)


def test_weights_must_match_targets():
    h, w, t, weights = _inputs(False)
    with pytest.raises(ValueError, match="weights"):
        fused_logprob_sum(h, w, t, weights[0, :, :5], vocab_major=False)


@pytest.mark.parametrize("vocab_major", [True, False], ids=["tied", "untied"])
# fsdp > 1 shards the kernel's hidden dimension: the recomputing fallback; (8, 1, 1) and (2, 1, 4) run the
# one-pass shard_map with rows split over data (and the vocabulary over tensor).
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (1, 1, 8), (8, 1, 1), (2, 1, 4)])
def test_sharded_on_8_devices_matches_single_device(vocab_major, shape):
    h, w, t, weights = _inputs(vocab_major, rows=8, length=12, hidden=16, vocab=48)
    (_, ref_logps), ref_grads = _reference(h, w, t, weights[0], vocab_major=vocab_major, softcap=4.0)
    mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    kernel_axes = ("vocab", "embed") if vocab_major else ("embed", "vocab")
    with jax.set_mesh(mesh), logical_rules(DEFAULT_RULES):
        h_s = jax.device_put(h, NamedSharding(mesh, logical_to_spec(("batch", None, None), DEFAULT_RULES)))
        w_s = jax.device_put(w, NamedSharding(mesh, logical_to_spec(kernel_axes, DEFAULT_RULES)))
        step = jax.jit(jax.value_and_grad(lambda h, w: fused_logprob_sum(
            h, w, t, weights[0], vocab_major=vocab_major, softcap=4.0, chunk_size=4), argnums=(0, 1), has_aux=True))
        hlo = step.lower(h_s, w_s).compile().as_text()
        (_, logps), grads = step(h_s, w_s)
    _close("sharded logps", logps, ref_logps)
    _close("sharded d hidden", grads[0], ref_grads[0])
    _close("sharded d kernel", grads[1], ref_grads[1])
    assert grads[1].sharding.is_equivalent_to(w_s.sharding, 2)
    if shape[1] > 1:  # the kernel gradient is reduce-scattered over fsdp
        assert "reduce-scatter" in hlo


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_sft_objective_one_pass_equals_recompute(name):
    """The SFT objective's loss, metrics and gradients agree between its two LM-head passes."""
    model = create_model(preset(name), seed=0)
    rng = np.random.RandomState(0)
    rows, length = 3, 16
    tokens = jnp.asarray(rng.randint(0, model.config.vocab_size, (rows, length + 1)), jnp.int32)
    segments = jnp.asarray([[1] * 10 + [2] * 6, [1] * 16, [1] * 12 + [0] * 4], jnp.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
             "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length)),
             "loss_mask": (segments > 0).astype(jnp.int32).at[0, :3].set(0)}
    from flax import nnx
    graphdef, params = nnx.split(model)
    results = {}
    for loss_pass in ("one_pass", "recompute"):
        objective = make_sft_objective("sequence_mean", loss_pass=loss_pass)
        fn = jax.jit(jax.value_and_grad(lambda p, o=objective: o(nnx.merge(graphdef, p), batch), has_aux=True))
        results[loss_pass] = fn(params)
    (loss_a, metrics_a), grads_a = results["one_pass"]
    (loss_b, metrics_b), grads_b = results["recompute"]
    _close("loss", loss_a, loss_b)
    _close("nll_sum", metrics_a["nll_sum"], metrics_b["nll_sum"], tol=1e-4)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(grads_a),
                                 jax.tree_util.tree_leaves_with_path(grads_b)):
        _close(jax.tree_util.keystr(path), a, b)
    with pytest.raises(ValueError, match="loss_pass"):
        make_sft_objective("token_mean", loss_pass="fast")
