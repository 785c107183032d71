"""Attention kernels against the dense-mask oracle (`attention.dense_xla_attention`: the whole [T, T] mask).

fp32, max absolute error over the rows that carry a segment (padding rows are unspecified),
forward and the gradients of q, k, v (kernel level) or of every parameter (model level).
Splash runs in Pallas interpret mode on CPU; cuDNN is checked by its argument mapping run
through `jax.nn.dot_product_attention(implementation="xla")` and by the dispatch logic.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain_jax.models import attention as attn
from posttrain_jax.models import create_model, preset

TOL = 1e-5


def _inputs(length, heads=4, kv_heads=2, dim=16, seed=0):
    """Two rows: three packed segments then padding, and one segment then padding."""
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(2, length, heads, dim), jnp.float32)
    k, v = (jnp.asarray(rng.randn(2, length, kv_heads, dim), jnp.float32) for _ in range(2))
    seg = np.zeros((2, length), np.int32)
    a, b = length * 3 // 8, length * 4 // 5
    seg[0, :a], seg[0, a:b], seg[0, b:b + 4], seg[1, :length * 3 // 4] = 1, 2, 3, 1
    cotangent = jnp.asarray(rng.randn(*q.shape), jnp.float32) * (seg != 0)[:, :, None, None]
    return q, k, v, jnp.asarray(seg), cotangent


def _max_err(a, b, seg=None):
    diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    if seg is not None:
        diff = diff * (np.asarray(seg) != 0)[:, :, None, None]
    return float(diff.max())


def _value_and_grads(fn, q, k, v, cotangent):
    """fn's output and the gradients of <output, cotangent> (zero on padding rows), jitted once."""
    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)
    return run(q, k, v)


def _check_kernel(fn, length, *, scale, softcap, window, label):
    q, k, v, seg, cotangent = _inputs(length)
    oracle = functools.partial(attn.dense_xla_attention, scale=scale, softcap=softcap, window=window)
    ref, ref_grads = _value_and_grads(lambda q, k, v: oracle(q, k, v, seg), q, k, v, cotangent)
    out, grads = _value_and_grads(lambda q, k, v: fn(q, k, v, seg), q, k, v, cotangent)
    errs = [_max_err(out, ref, seg)] + [_max_err(a, b) for a, b in zip(grads, ref_grads)]
    print(f"{label}: forward {errs[0]:.1e}, dq {errs[1]:.1e}, dk {errs[2]:.1e}, dv {errs[3]:.1e}")
    assert max(errs) < TOL, (label, errs)


@pytest.mark.parametrize("length,window,softcap", [(512, None, None), (512, 130, 3.0), (300, 5, None)])
def test_xla_causal_query_chunks_match_dense_oracle(length, window, softcap):
    # implementation="xla" cuts the queries into causal chunks (4 at 512, 2 at 300, uneven tails)
    # that read only the keys they can see: packed rows, padding, GQA, windows across chunk edges.
    fn = functools.partial(attn.attention, implementation="xla", scale=0.3, softcap=softcap, window=window)
    _check_kernel(fn, length, scale=0.3, softcap=softcap, window=window, label=f"xla chunks T={length}")


@pytest.mark.parametrize("window,softcap", [(None, None), (5, 3.0)])
def test_blocked_matches_oracle(window, softcap):
    """Several blocks, T not a multiple of the block, packing, padding, GQA, window, soft-cap."""
    fn = functools.partial(attn.attention, implementation="blocked", scale=0.3, softcap=softcap, window=window,
                           block=16)
    _check_kernel(fn, 40, scale=0.3, softcap=softcap, window=window, label=f"blocked window={window}")


@pytest.mark.parametrize("window", [None, 37])
def test_splash_interpret_matches_oracle(window):
    """Splash (Pallas interpret mode): two 128-blocks, packing, padding, GQA, Gemma 3's window."""
    fn = functools.partial(attn.attention, implementation="splash", scale=0.25, window=window, block=128)
    _check_kernel(fn, 200, scale=0.25, softcap=None, window=window, label=f"splash window={window}")


def test_splash_sharded_over_batch_and_heads():
    """Under a data x fsdp x tensor mesh the kernel runs in shard_map: rows over (data, fsdp),
    heads over tensor, as the sharding rules say; equal to the oracle on one device."""
    from posttrain_jax.mesh import make_mesh
    from posttrain_jax.sharding import DEFAULT_RULES, logical_rules

    q, k, v, seg, cotangent = _inputs(128)
    q, k, v, seg, cotangent = (jnp.concatenate([x, x[::-1]]) for x in (q, k, v, seg, cotangent))  # 4 rows
    oracle = functools.partial(attn.dense_xla_attention, scale=0.25, softcap=None, window=None)
    ref, ref_grads = _value_and_grads(lambda q, k, v: oracle(q, k, v, seg), q, k, v, cotangent)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh), logical_rules(DEFAULT_RULES):
        fn = functools.partial(attn.attention, implementation="splash", scale=0.25, block=128)
        out, grads = _value_and_grads(lambda q, k, v: fn(q, k, v, seg), q, k, v, cotangent)
    errs = [_max_err(out, ref, seg)] + [_max_err(a, b) for a, b in zip(grads, ref_grads)]
    print(f"splash sharded: forward {errs[0]:.1e}, grads {max(errs[1:]):.1e}")
    assert max(errs) < TOL, errs


@pytest.mark.parametrize("window", [None, 5])
def test_cudnn_argument_mapping_matches_oracle(window):
    """The cuDNN call's arguments (is_causal, local_window_size, segment mask) through XLA."""
    fn = functools.partial(attn.cudnn_attention, scale=0.3, window=window, implementation="xla")
    _check_kernel(fn, 24, scale=0.3, softcap=None, window=window, label=f"cudnn mapping window={window}")


def test_auto_and_explicit_dispatch():
    fp32 = jnp.zeros((1, 16, 4, 64), jnp.float32)
    bf16, long = fp32.astype(jnp.bfloat16), jnp.zeros((1, attn.BLOCKED_MIN_LENGTH, 4, 64), jnp.float32)
    resolve = attn.resolve_implementation
    assert resolve("auto", bf16, softcap=None, platform="tpu") == "splash"
    assert resolve("auto", fp32, softcap=50.0, platform="tpu") == "splash"
    assert resolve("auto", bf16, softcap=None, platform="gpu") == "cudnn"
    assert resolve("auto", fp32, softcap=None, platform="gpu") == "xla"  # cuDNN flash needs 16-bit
    assert resolve("auto", bf16, softcap=50.0, platform="gpu") == "xla"  # no soft-cap in cuDNN
    assert resolve("auto", bf16[..., :12], softcap=None, platform="gpu") == "xla"  # head_dim % 8
    assert resolve("auto", fp32, softcap=None, platform="cpu") == "xla"
    assert resolve("auto", long, softcap=None, platform="cpu") == "blocked"
    assert resolve("blocked", fp32, softcap=None, platform="tpu") == "blocked"
    with pytest.raises(ValueError, match="is not one of"):
        resolve("flash", fp32, softcap=None)
    with pytest.raises(ValueError, match="bfloat16 or float16.*model.attention"):
        attn.attention(fp32, fp32, fp32, jnp.ones((1, 16), jnp.int32), implementation="cudnn", scale=1.0)
    with pytest.raises(ValueError, match="attention 'flash'"):
        preset("tiny-llama", attention="flash")


def test_blocked_memory_is_linear_in_length():
    """Compiled forward + backward at T=2048: the oracle's temporaries hold [T, T] scores, the
    blocked kernel's only O(T x head_dim) residuals and one block of scores."""
    length, block = 2048, 256
    q = jax.ShapeDtypeStruct((1, length, 4, 32), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def temp_bytes(impl):
        def loss(q, k, v, seg):
            return jnp.sum(attn.attention(q, k, v, seg, implementation=impl, scale=0.2, block=block) ** 2)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    dense, blocked = temp_bytes("xla"), temp_bytes("blocked")
    scores = 4 * length * length * 4  # one float32 [heads, T, T]
    print(f"T={length}: temporaries xla {dense / 2**20:.1f} MiB, blocked {blocked / 2**20:.1f} MiB")
    assert dense >= scores
    assert blocked < scores / 8  # 64 * T * block * 4 bytes would already be 1/4 of it


# ---------------------------------------------------------------- whole models, every family

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"]
# Whole-model compiles take 10-30 s each on 2 cores: the default run keeps Gemma 3 (windows, GQA,
# qk-norm, sandwich norms) with the blocked kernel; every family and kernel runs with POSTTRAIN_JAX_SLOW=1.
_DEFAULT_FAMILY = "tiny-gemma3"
SLOW = os.environ.get("POSTTRAIN_JAX_SLOW") == "1"
MODEL_FAMILIES = [name if name == _DEFAULT_FAMILY else pytest.param(name, marks=pytest.mark.slow)
                  for name in FAMILIES]


def _batch(length, vocab):
    rng = np.random.RandomState(3)
    tokens = rng.randint(1, vocab, size=(2, length)).astype(np.int32)
    segments = np.zeros((2, length), np.int32)
    positions = np.zeros((2, length), np.int32)
    for row, spans in enumerate([[(0, 9), (9, 20), (20, length - 3)], [(0, length - 7)]]):
        for seg, (a, b) in enumerate(spans, start=1):
            segments[row, a:b], positions[row, a:b] = seg, np.arange(b - a)
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)


def _model_parity(name, implementation, length=30, block=8):
    """Logits and every parameter gradient of a packed, padded batch vs the oracle."""
    config = preset(name, attention="xla", attention_block=block)
    if name == _DEFAULT_FAMILY and not SLOW:  # one sliding and one global layer: half the compile
        config = config.replace(num_layers=2, layer_types=config.layer_types[1:])
    params = nnx.split(create_model(config, seed=2), nnx.Param)[1]
    tokens, positions, segments = _batch(length, config.vocab_size)
    valid = segments != 0

    def run(config):
        graph = nnx.split(create_model(config, seed=2), nnx.Param)[0]

        @jax.jit
        def value_and_grad(params):
            def loss(params):
                logits = nnx.merge(graph, params)(tokens, positions, segments)
                logp = jax.nn.log_softmax(logits[:, :-1])
                picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
                return -jnp.sum(picked * (valid[:, 1:] & valid[:, :-1])), logits
            return jax.value_and_grad(loss, has_aux=True)(params)
        return value_and_grad(params)

    (_, ref_logits), ref_grads = run(config)
    (_, logits), grads = run(config.replace(attention=implementation))
    fwd = float(jnp.abs(jnp.where(valid[..., None], logits - ref_logits, 0.0)).max())
    grad = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    print(f"{name} {implementation}: logits {fwd:.1e}, grads {grad:.1e} (largest grad {scale:.1e})")
    assert fwd < 1e-4 and grad < 1e-4 * max(1.0, scale), (fwd, grad)


@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_blocked_model_parity(name):
    _model_parity(name, "blocked", block=8 if SLOW else 16)


@pytest.mark.slow  # the kernel-level mapping test above is exact (0.0); this adds whole models
@pytest.mark.parametrize("name", FAMILIES)
def test_cudnn_mapping_model_parity(name, monkeypatch):
    monkeypatch.setattr(attn, "cudnn_supported", lambda q, softcap: None)
    monkeypatch.setattr(attn, "cudnn_attention", functools.partial(attn.cudnn_attention, implementation="xla"))
    _model_parity(name, "cudnn")


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_splash_interpret_model_parity(name):
    _model_parity(name, "splash")
