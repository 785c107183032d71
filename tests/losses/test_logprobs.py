"""The fused LM-head log-probs against the unfused path: values, gradients, sharding, memory.

The reference is autodiff of `token_logprobs(softcap(hidden @ kernel) / T, targets)` (and
`token_entropy`) on the same inputs, all float32: agreement is to float32 rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from posttrain_jax.losses.grpo import token_entropy
from posttrain_jax.losses.logprobs import (DEFAULT_CHUNK_ELEMENTS, default_chunk_size, fused_token_logprobs, lm_head_logprobs,
                                           token_logprobs)
from posttrain_jax.models import create_model
from posttrain_jax.models.config import preset
from posttrain_jax.sharding import DEFAULT_RULES, logical_rules, logical_to_spec

TOL = 2e-5  # float32: chunked sums and recomputed logits differ from the unfused path only in rounding


def _inputs(vocab_major, rows=4, length=12, hidden=16, vocab=40, seed=0):
    rng = np.random.RandomState(seed)
    h = jnp.asarray(rng.randn(rows, length, hidden), jnp.float32)
    shape = (vocab, hidden) if vocab_major else (hidden, vocab)
    w = jnp.asarray(rng.randn(*shape) * 0.5, jnp.float32)
    t = jnp.asarray(rng.randint(0, vocab, (rows, length)), jnp.int32)
    weights = jnp.asarray(rng.randn(2, rows, length), jnp.float32)
    return h, w, t, weights


def _unfused(h, w, t, *, vocab_major, softcap=None, temperature=1.0):
    logits = h @ (w.T if vocab_major else w)
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    logits = logits.astype(jnp.float32) / temperature
    return token_logprobs(logits, t), token_entropy(logits), jnp.max(jax.nn.log_softmax(logits), -1)


def _close(name, ours, ref, tol=TOL):
    err = float(np.max(np.abs(np.asarray(ours) - np.asarray(ref))))
    print(f"{name}: max abs err {err:.2e}")
    assert err < tol, f"{name}: {err} >= {tol}"


@pytest.mark.parametrize("vocab_major,softcap,temperature,chunk_size", [
    (True, None, 1.0, None), (False, None, 0.7, 5), (True, 3.0, 0.7, 4), (False, 3.0, 1.0, 64)],
    ids=["tied-one-chunk", "untied-temperature-padded-chunks", "tied-softcap-temperature", "untied-softcap"])
def test_values_and_gradients_match_unfused(vocab_major, softcap, temperature, chunk_size):
    h, w, t, weights = _inputs(vocab_major)

    def loss(fn):
        def f(h, w):
            logps, entropy, top = fn(h, w)
            return jnp.sum(weights[0] * logps) + jnp.sum(weights[1] * entropy), (logps, entropy, top)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    ref = loss(lambda h, w: _unfused(h, w, t, vocab_major=vocab_major, softcap=softcap, temperature=temperature))
    ours = loss(lambda h, w: fused_token_logprobs(h, w, t, vocab_major=vocab_major, softcap=softcap,
                                                  temperature=temperature, chunk_size=chunk_size,
                                                  with_entropy=True, with_max=True))
    (ref_loss, ref_out), ref_grads = ref(h, w)
    (our_loss, our_out), our_grads = ours(h, w)
    for name, a, b in zip(("logps", "entropy", "max_logps"), our_out, ref_out):
        _close(name, a, b)
    _close("d hidden", our_grads[0], ref_grads[0])
    _close("d kernel", our_grads[1], ref_grads[1])


def test_logps_alone_and_argmax_hits():
    h, w, t, weights = _inputs(True)
    fused = jax.jit(lambda t: fused_token_logprobs(h, w, t, vocab_major=True, chunk_size=5, with_max=True))
    out = fused(t)
    assert out.entropy is None
    greedy = jnp.argmax(h @ w.T, -1)
    hits = fused(greedy)
    assert bool(jnp.all(hits.logps >= hits.max_logps))
    np.testing.assert_array_equal(np.asarray(out.logps >= out.max_logps), np.asarray(greedy == t))
    grads = jax.jit(jax.grad(lambda h: jnp.sum(fused_token_logprobs(h, w, t, vocab_major=True,
                                                                    chunk_size=4).logps)))(h)
    ref = jax.jit(jax.grad(lambda h: jnp.sum(_unfused(h, w, t, vocab_major=True)[0])))(h)
    _close("d hidden (logps only)", grads, ref)


def test_default_chunk_size():
    assert default_chunk_size(rows=8, length=512, vocab=512) == 512  # everything fits: one chunk
    assert default_chunk_size(rows=8, length=512, vocab=262144) == 16  # 8 x 16 x 262144 = 2^25
    assert default_chunk_size(rows=2, length=8192, vocab=128256) == 128
    assert default_chunk_size(rows=64, length=4096, vocab=2**22) == 1


def test_errors_name_the_shapes():
    h, w, t, _ = _inputs(True)
    with pytest.raises(ValueError, match="does not match hidden size"):
        fused_token_logprobs(h, w.T, t, vocab_major=True)
    with pytest.raises(ValueError, match="targets"):
        fused_token_logprobs(h, w, t[:, :3], vocab_major=True)
    with pytest.raises(ValueError, match=">= 0"):
        fused_token_logprobs(h, w, t, vocab_major=True, chunk_size=-1)


@pytest.mark.parametrize("name,overrides", [
    ("tiny-llama", {"tie_embeddings": True}), ("tiny-llama", {}), ("tiny-qwen2", {}), ("tiny-qwen3", {}),
    ("tiny-gemma3", {}), ("tiny-gemma3", {"final_logit_softcap": 5.0})],
    ids=["llama-tied", "llama-untied", "qwen2", "qwen3", "gemma3", "gemma3-softcap"])
def test_every_family_matches_model_head(name, overrides):
    """Through the model's own kernel and softcap: log-probs and head-parameter gradients equal
    those of `model.head` + softmax (the layers below the head are the same code either way)."""
    model = create_model(preset(name, **overrides))
    rng = np.random.RandomState(1)
    hidden = jnp.asarray(rng.randn(2, 16, model.config.hidden_size), jnp.float32)
    targets = jnp.asarray(rng.randint(0, model.config.vocab_size, (2, 16)), jnp.int32)
    graphdef, params = nnx.split(model)

    def loss(fused):
        def f(p):
            m = nnx.merge(graphdef, p)
            logps = (lm_head_logprobs(m, hidden, targets, temperature=0.9, chunk_size=4).logps if fused
                     else token_logprobs(m.head(hidden).astype(jnp.float32) / 0.9, targets))
            return jnp.sum(logps * jnp.arange(16.0)), logps
        return jax.jit(jax.value_and_grad(f, has_aux=True))

    (_, ours), our_grads = loss(True)(params)
    (_, ref), ref_grads = loss(False)(params)
    _close(f"{name} logps", ours, ref)
    kernel = "embed" if model.config.tie_embeddings else "lm_head"
    _close(f"{name} d {kernel}", our_grads[kernel][...], ref_grads[kernel][...])
    assert float(jnp.max(jnp.abs(ref_grads[kernel][...]))) > 0.1


@pytest.mark.parametrize("vocab_major", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1), (1, 1, 8)])
def test_sharded_on_8_devices_matches_single_device(vocab_major, shape):
    """Rows over data/fsdp, vocab over tensor, kernel hidden dim over fsdp: same values and gradients."""
    h, w, t, weights = _inputs(vocab_major, rows=8, length=12, hidden=16, vocab=48)

    def f(h, w):
        out = fused_token_logprobs(h, w, t, vocab_major=vocab_major, softcap=4.0, chunk_size=4,
                                   with_entropy=True, with_max=True)
        return jnp.sum(weights[0] * out.logps) + jnp.sum(weights[1] * out.entropy), out

    ref_f = jax.jit(jax.value_and_grad(lambda h, w: (lambda o: (jnp.sum(weights[0] * o[0]) + jnp.sum(
        weights[1] * o[1]), o))(_unfused(h, w, t, vocab_major=vocab_major, softcap=4.0)), argnums=(0, 1),
        has_aux=True))
    (_, ref_out), ref_grads = ref_f(h, w)
    mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    kernel_axes = ("vocab", "embed") if vocab_major else ("embed", "vocab")
    with jax.set_mesh(mesh), logical_rules(DEFAULT_RULES):
        h_s = jax.device_put(h, NamedSharding(mesh, logical_to_spec(("batch", None, None), DEFAULT_RULES)))
        w_s = jax.device_put(w, NamedSharding(mesh, logical_to_spec(kernel_axes, DEFAULT_RULES)))
        step = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
        hlo = step.lower(h_s, w_s).compile().as_text()
        (_, out), grads = step(h_s, w_s)
    _close("sharded logps", out.logps, ref_out[0])
    _close("sharded entropy", out.entropy, ref_out[1])
    _close("sharded max_logps", out.max_logps, ref_out[2])
    _close("sharded d hidden", grads[0], ref_grads[0])
    _close("sharded d kernel", grads[1], ref_grads[1])
    assert grads[1].sharding.is_equivalent_to(w_s.sharding, 2)
    if shape[1] > 1:  # the kernel gradient is reduce-scattered over fsdp, never all-reduced whole
        assert "reduce-scatter" in hlo


def test_memory_large_vocabulary():
    """Compiled temporaries: the fused path holds one chunk of logits, the unfused one all of them."""
    rows, length, hidden, vocab = 2, 1024, 64, 262144
    h = jax.ShapeDtypeStruct((rows, length, hidden), jnp.float32)
    w = jax.ShapeDtypeStruct((vocab, hidden), jnp.float32)
    t = jax.ShapeDtypeStruct((rows, length), jnp.int32)

    def grads(fused):
        def f(h, w, t):
            logps = (fused_token_logprobs(h, w, t, vocab_major=True).logps if fused
                     else token_logprobs(h @ w.T, t))
            return jnp.sum(logps)
        return jax.jit(jax.grad(f, argnums=(0, 1)))

    temps = {}
    for fused in (False, True):
        stats = grads(fused).lower(h, w, t).compile().memory_analysis()
        temps[fused] = stats.temp_size_in_bytes
    full_logits = rows * length * vocab * 4
    print(f"temporaries: unfused {temps[False] / 2**20:.0f} MiB, fused {temps[True] / 2**20:.0f} MiB "
          f"(full float32 logits {full_logits / 2**20:.0f} MiB, kernel {vocab * hidden * 4 / 2**20:.0f} MiB)")
    assert temps[False] >= full_logits
    # a few chunk-sized float32 buffers (logits, their gradient) and nothing of the full logits' size
    assert temps[True] <= 3 * 4 * DEFAULT_CHUNK_ELEMENTS + vocab * hidden * 4
    assert temps[True] < temps[False] / 8
