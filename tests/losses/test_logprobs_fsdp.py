"""The fused LM-head log-probs where FSDP shards the kernel's hidden dimension.

There the forward pass loops over vocabulary slices with an online logsumexp and both passes
all-gather one kernel slice at a time. Checked against autodiff of the unfused
`token_logprobs(softcap(hidden @ kernel) / T, targets)` (float32, the tolerance of
test_logprobs.py), and in the compiled HLO: no all-gather ever produces the whole kernel.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from posttrain_jax.losses.lm_head_chunks import plan_and_pad, vocab_slice
from posttrain_jax.losses.logprob_sum import fused_logprob_sum
from posttrain_jax.losses.logprobs import fused_token_logprobs
from posttrain_jax.sharding import DEFAULT_RULES, logical_rules, logical_to_spec
from tests.losses.test_logprobs import TOL, _close, _inputs, _unfused

ROWS, LENGTH, HIDDEN, VOCAB = 8, 12, 16, 48


def _mesh(shape):
    return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _place(mesh, h, w, vocab_major):
    kernel_axes = ("vocab", "embed") if vocab_major else ("embed", "vocab")
    h_s = jax.device_put(h, NamedSharding(mesh, logical_to_spec(("batch", None, None), DEFAULT_RULES)))
    w_s = jax.device_put(w, NamedSharding(mesh, logical_to_spec(kernel_axes, DEFAULT_RULES)))
    return h_s, w_s


def all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of every all-gather in compiled HLO text (each element of a combined tuple)."""
    shapes = []
    for line in hlo.splitlines():
        found = re.search(r"= (.*?) all-gather(?:-start)?\(", line)
        if found:
            shapes += [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([\d,]*)\]", found[1])]
    return shapes


def assert_kernel_gathered_in_slices(hlo: str, *, vocab_major: bool, local_vocab: int, vocab_chunk: int):
    """No all-gather yields the kernel's whole local vocabulary; some yield one slice with the whole hidden dim."""
    def oriented(vocab):
        return (vocab, HIDDEN) if vocab_major else (HIDDEN, vocab)
    shapes = all_gather_shapes(hlo)
    whole = {oriented(local_vocab), oriented(VOCAB)}
    assert not whole & set(shapes), f"a whole kernel is all-gathered: {shapes}"
    assert oriented(vocab_chunk) in shapes, f"no kernel slice {oriented(vocab_chunk)} gathered: {shapes}"


CASES = [  # (mesh data x fsdp x tensor, tied, softcap, temperature, kernel scale)
    ((1, 8, 1), True, None, 1.0, 1.0), ((1, 8, 1), False, 3.0, 0.7, 1.0), ((1, 8, 1), False, None, 1.0, 6.0),
    ((1, 4, 2), True, 3.0, 0.7, 1.0), ((1, 4, 2), False, None, 0.7, 6.0), ((2, 2, 2), True, None, 1.0, 6.0),
    ((2, 2, 2), False, 3.0, 1.0, 1.0)]


@pytest.mark.parametrize("shape,vocab_major,softcap,temperature,scale", CASES,
                         ids=["fsdp8-tied", "fsdp8-untied-softcap-temp", "fsdp8-untied-large-logits",
                              "fsdp4-tp2-tied-softcap-temp", "fsdp4-tp2-untied-temp-large-logits",
                              "dp2-fsdp2-tp2-tied-large-logits", "dp2-fsdp2-tp2-untied-softcap"])
def test_fsdp_vocab_chunks_match_unfused(shape, vocab_major, softcap, temperature, scale):
    """Values (log-probs, entropy, argmax log-prob) and gradients to hidden and kernel; three vocabulary
    slices per device (chunk_size 4 of 12 positions = a third of the local vocabulary per slice)."""
    h, w, t, weights = _inputs(vocab_major, rows=ROWS, length=LENGTH, hidden=HIDDEN, vocab=VOCAB)
    w = w * scale  # logits with std ~ 6 x 2: the running maximum moves between slices
    numerics = dict(vocab_major=vocab_major, softcap=softcap, temperature=temperature)

    def loss(fn):
        def f(h, w):
            logps, entropy, top = fn(h, w)
            return jnp.sum(weights[0] * logps) + jnp.sum(weights[1] * entropy), (logps, entropy, top)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (_, ref_out), ref_grads = loss(lambda h, w: _unfused(h, w, t, **numerics))(h, w)
    mesh = _mesh(shape)
    with jax.set_mesh(mesh), logical_rules(DEFAULT_RULES):
        h_s, w_s = _place(mesh, h, w, vocab_major)
        plan = plan_and_pad(h_s, w_s, t, chunk_size=4, **numerics)[0]
        step = loss(lambda h, w: fused_token_logprobs(h, w, t, chunk_size=4, with_entropy=True, with_max=True,
                                                      **numerics))
        hlo = step.lower(h_s, w_s).compile().as_text()
        (_, out), grads = step(h_s, w_s)
    local_vocab = VOCAB // shape[2]
    assert plan.vocab_forward and plan.chunk == LENGTH and plan.pad == 0
    assert plan.vocab_chunk == local_vocab // 3
    for name, ours, ref in zip(("logps", "entropy", "max_logps", "d hidden", "d kernel"), (*out, *grads),
                               (*ref_out, *ref_grads)):
        # float32 rounding is relative: with the kernel x 6 |d hidden| reaches 46, and against a float64
        # reference this path's error is 7.0e-5 there (the single-device fused path's 1.0e-4, the unfused
        # float32 path's 2.0e-5), so the bound scales with the largest magnitude when that exceeds 1.
        _close(name, ours, ref, tol=TOL * max(1.0, float(jnp.max(jnp.abs(ref)))) if scale != 1.0 else TOL)
    assert grads[1].sharding.is_equivalent_to(w_s.sharding, 2)
    assert_kernel_gathered_in_slices(hlo, vocab_major=vocab_major, local_vocab=local_vocab,
                                     vocab_chunk=plan.vocab_chunk)


def test_only_a_sharded_hidden_dim_takes_the_vocabulary_path():
    """One device, data-only and tensor-only meshes keep the sequence-chunked forward."""
    h, w, t, _ = _inputs(False, rows=ROWS, length=LENGTH, hidden=HIDDEN, vocab=VOCAB)
    assert not plan_and_pad(h, w, t, vocab_major=False, softcap=None, temperature=1.0, chunk_size=4)[0].vocab_forward
    for shape, expected in (((8, 1, 1), False), ((1, 1, 8), False), ((1, 2, 4), True)):
        mesh = _mesh(shape)
        with jax.set_mesh(mesh), logical_rules(DEFAULT_RULES):
            h_s, w_s = _place(mesh, h, w, False)
            plan = plan_and_pad(h_s, w_s, t, vocab_major=False, softcap=None, temperature=1.0, chunk_size=5)[0]
        assert plan.vocab_forward == expected, shape
        assert plan.chunk == (LENGTH if expected else 5)


@pytest.mark.parametrize("vocab_major", [True, False], ids=["tied", "untied"])
def test_one_pass_sum_under_fsdp_gathers_no_whole_kernel(vocab_major):
    """`fused_logprob_sum` on an FSDP kernel takes the recomputing path: same values and gradients,
    and no whole-kernel all-gather (a one pass over sequence chunks would need one)."""
    h, w, t, weights = _inputs(vocab_major, rows=ROWS, length=LENGTH, hidden=HIDDEN, vocab=VOCAB)

    def ref(h, w):
        logps = _unfused(h, w, t, vocab_major=vocab_major, softcap=4.0)[0]
        return jnp.sum(weights[0] * logps), logps

    (ref_total, ref_logps), ref_grads = jax.jit(jax.value_and_grad(ref, argnums=(0, 1), has_aux=True))(h, w)
    mesh = _mesh((1, 4, 2))
    with jax.set_mesh(mesh), logical_rules(DEFAULT_RULES):
        h_s, w_s = _place(mesh, h, w, vocab_major)
        step = jax.jit(jax.value_and_grad(lambda h, w: fused_logprob_sum(
            h, w, t, weights[0], vocab_major=vocab_major, softcap=4.0, chunk_size=4), argnums=(0, 1), has_aux=True))
        hlo = step.lower(h_s, w_s).compile().as_text()
        (total, logps), grads = step(h_s, w_s)
    _close("total", total, ref_total, tol=TOL * max(1.0, float(abs(ref_total))))
    _close("logps", logps, ref_logps)
    _close("d hidden", grads[0], ref_grads[0])
    _close("d kernel", grads[1], ref_grads[1])
    assert_kernel_gathered_in_slices(hlo, vocab_major=vocab_major, local_vocab=VOCAB // 2, vocab_chunk=8)


def test_online_logsumexp_merge_of_disjoint_parts():
    """`_merge` of the statistics of two halves equals those of the whole (and the empty start is neutral)."""
    from posttrain_jax.losses.logprobs import _merge
    z = jnp.asarray(np.random.RandomState(0).randn(3, 10) * 30, jnp.float32)

    def stats(x):
        m = jnp.max(x, -1)
        e = jnp.exp(x - m[:, None])
        return m, jnp.sum(e, -1), jnp.sum(e * (x - m[:, None]), -1)

    empty = (jnp.full((3,), -jnp.inf), jnp.zeros(3), jnp.zeros(3))
    merged = _merge(_merge(empty, stats(z[:, :4])), stats(z[:, 4:]))
    m, s, t = merged
    lse, p = m + jnp.log(s), jax.nn.softmax(z, -1)
    _close("lse", lse, jax.nn.logsumexp(z, -1), tol=1e-5)
    _close("entropy", jnp.log(s) - t / s, -jnp.sum(p * jax.nn.log_softmax(z, -1), -1), tol=1e-5)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in merged)


def test_vocab_slices_do_not_collapse_on_awkward_vocabularies():
    # Qwen's 151936 = 2^7 x 1187: the largest divisor under 1024 is 128 (1187 slices, each an all-gather
    # under FSDP); the slice goes up to 1187 (<= 2 x the limit) instead. Llama 3 and Gemma 3 keep theirs.
    assert vocab_slice(151936, 1024) == 1187
    assert vocab_slice(151936, 4096) == 2374
    assert vocab_slice(128256, 8192) == 8016 and 128256 % 8016 == 0
    assert vocab_slice(262144, 3000) == 2048
    assert vocab_slice(48, 8) == 8 and vocab_slice(7, 3) == 1  # a prime with no divisor near the limit
    assert vocab_slice(48, 1000) == 48  # a budget past the vocabulary: one slice
