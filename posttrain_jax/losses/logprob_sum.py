"""A weighted sum of target log-probs with its gradient taken in the forward pass.

When the loss is linear in the per-token log-probs with weights that carry no gradient
(every SFT aggregation of Tülu 3: `sum_t w_t log p(t)`), the gradient of the LM head
and softmax is known as soon as a chunk's logits are: d/dz of w_t log p(t) is
w_t (onehot(t) - p). `fused_logprob_sum` computes, per sequence chunk, the logits, the
log-probs, and then d hidden and d kernel straight away, so the backward pass only
scales them by the loss's cotangent: three LM-head matmuls per step instead of the four of
`fused_token_logprobs` (forward, recomputed logits, d hidden, d kernel). This is Liger
Kernel's fused linear cross-entropy (Hsu et al. 2024, "Liger Kernel", §3.2).

The price is memory: the whole kernel and a float32 accumulator of its gradient
([vocab, hidden] per device) live through the forward pass, where the recomputing path
holds one vocabulary slice at a time. `loss_pass="auto"` in the SFT objective therefore
picks this on CPU (FLOPs bound, memory plentiful) and recomputes on TPU and GPU (HBM
bound). Where the kernel's hidden dimension is sharded (FSDP) a pass over sequence chunks
would need the whole kernel gathered on every device, so there `fused_logprob_sum` takes
the recomputing path (`fused_token_logprobs`, summed) whatever the caller asked for.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from posttrain_jax.losses.lm_head_chunks import (Plan, chunk_logits, on_mesh, plan_and_pad, psum_vocab,
                                                 reduce_kernel_grad, seq_chunk, vocab_ids)
from posttrain_jax.losses.logprobs import fused_token_logprobs


def fused_logprob_sum(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array, *,
                      vocab_major: bool, softcap: float | None = None, temperature: float = 1.0,
                      chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum_t weights_t * log p(targets_t), log p(targets)) of the LM head on `hidden`.

    Args:
      hidden: final (normed) hidden states [batch, length, hidden], compute dtype.
      kernel: LM head kernel, [vocab, hidden] when `vocab_major` (tied embedding) else [hidden, vocab].
      targets: int [batch, length] token ids in [0, vocab).
      weights: float [batch, length]; no gradient flows to them (they are stop_gradient-ed).
      softcap, temperature, chunk_size: as in `logprobs.fused_token_logprobs`.

    Returns:
      (total: float32 scalar, logps: [batch, length] float32 without gradient). Gradients of
      `total` reach `hidden` and `kernel` and equal autodiff of the unfused
      `sum(weights * token_logprobs(softcap(hidden @ kernel) / temperature, targets))` up to
      float32 rounding. The kernel's gradient is only computed when the kernel is differentiated
      (a frozen LoRA base skips that matmul). Where the kernel's hidden dimension is sharded
      over the mesh (FSDP) this is `fused_token_logprobs` summed: the same results, without a
      whole kernel and its float32 gradient on every device.
    """
    if weights.shape != targets.shape:
        raise ValueError(f"weights {weights.shape} must have the shape of targets {targets.shape}")
    # Each chunk adds into a kernel-sized accumulator: a chunk of at least hidden / 2 tokens keeps that
    # read-modify-write small next to the chunk's matmuls (Gemma 3 270M's head + loss, forward and backward,
    # 8 x 512 on 2 CPU cores: 32 positions per chunk 29.3 s, 64 27.0 s, 128 28.4 s; bench-small keeps its 128).
    hidden_size = kernel.shape[1 if vocab_major else 0]
    numerics = dict(vocab_major=vocab_major, softcap=softcap, temperature=temperature, chunk_size=chunk_size)
    plan, padded_hidden, padded_targets = plan_and_pad(hidden, kernel, targets, min_chunk_tokens=hidden_size // 2,
                                                       **numerics)
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
    if plan.vocab_forward:
        # The kernel's hidden dimension is sharded (FSDP): one pass would gather the whole kernel and hold a
        # float32 gradient of it on every device, so take the recomputing path (same values and gradients).
        logps = fused_token_logprobs(hidden, kernel, targets, **numerics).logps
        return jnp.sum(weights * logps), jax.lax.stop_gradient(logps)
    hidden, targets = padded_hidden, padded_targets
    if plan.pad:
        weights = jnp.pad(weights, ((0, 0), (0, plan.pad)))
    total, logps = _summed(plan, hidden, kernel, targets, weights)
    return total, jax.lax.stop_gradient(logps[:, :logps.shape[1] - plan.pad])


def _local(plan: Plan, grads: tuple[bool, bool], hidden, kernel, targets, weights):
    """This device's log-probs, then d total / d hidden and d total / d kernel where `grads` asks."""
    with_hidden_grad, with_kernel_grad = grads
    w = kernel  # whole hidden dimension here: an FSDP-sharded kernel took the recomputing path
    vocab_dim = 0 if plan.vocab_major else 1
    ids = vocab_ids(plan, w.shape[vocab_dim])
    acc = jnp.promote_types(hidden.dtype, jnp.float32)
    h_spec = "bcv,vh->bch" if plan.vocab_major else "bcv,hv->bch"

    def body(d_w, i):
        h, g = seq_chunk(hidden, i, plan.chunk), seq_chunk(weights, i, plan.chunk)[..., None]
        z, slope = chunk_logits(plan, h, w)
        hit = ids == seq_chunk(targets, i, plan.chunk)[..., None]
        top = jnp.max(z, axis=-1, keepdims=True)
        if plan.vocab_axes:
            top = jax.lax.pmax(top, plan.vocab_axes)
        # exp once, kept (a barrier stops XLA from recomputing it inside each consumer's fusion)
        shifted = jax.lax.optimization_barrier(jnp.exp(z - top))
        total = psum_vocab(plan, jnp.sum(shifted, axis=-1, keepdims=True))
        lse = top + jnp.log(total)
        logp = psum_vocab(plan, jnp.sum(jnp.where(hit, z, 0.0), axis=-1)) - lse[..., 0]
        d_z = jnp.where(hit, g, 0.0) - shifted * (g / total)  # d (w log p(t)) / dz = w (onehot - p)
        if slope is not None:
            d_z = d_z * slope
        if plan.temperature != 1.0:
            d_z = d_z / plan.temperature
        d_z = jax.lax.optimization_barrier(d_z.astype(w.dtype))  # made once, read by both matmuls
        d_h = None
        if with_hidden_grad:
            d_h = psum_vocab(plan, jnp.einsum(h_spec, d_z, w, preferred_element_type=acc)).astype(hidden.dtype)
        if with_kernel_grad:
            # d kernel^T [hidden, vocab] = h^T d_z, with h^T made row-major (small) so that the big d_z is
            # read as it is (see models/dense.py); a tied [vocab, hidden] kernel is transposed once at the end.
            h_t = jax.lax.optimization_barrier(h.reshape(-1, h.shape[-1]).T)
            d_w = d_w + jnp.dot(h_t, d_z.reshape(-1, d_z.shape[-1]), preferred_element_type=acc)
        return d_w, (logp, d_h)

    hidden_size, vocab = w.shape[1 - vocab_dim], w.shape[vocab_dim]
    init = jnp.zeros((hidden_size, vocab) if with_kernel_grad else (), acc)
    d_w, (logps, d_hidden) = jax.lax.scan(body, init, jnp.arange(hidden.shape[1] // plan.chunk))
    outs = [jnp.moveaxis(logps, 0, 1).reshape(targets.shape)]  # [chunks, rows, chunk] -> [rows, length]
    if with_hidden_grad:
        outs.append(jnp.moveaxis(d_hidden, 0, 1).reshape(hidden.shape))
    if with_kernel_grad:
        outs.append(reduce_kernel_grad(plan, d_w.T if plan.vocab_major else d_w, 1 - vocab_dim).astype(kernel.dtype))
    return tuple(outs)


def _run(plan: Plan, grads: tuple[bool, bool], hidden, kernel, targets, weights):
    """(total, logps, d hidden or None, d kernel or None)."""
    outs = "r" + "r" * grads[0] + "k" * grads[1]
    results = list(on_mesh(plan, functools.partial(_local, plan, grads), "rkrr", outs)(hidden, kernel, targets,
                                                                                         weights))
    logps = results.pop(0)
    d_hidden = results.pop(0) if grads[0] else None
    d_kernel = results.pop(0) if grads[1] else None
    return jnp.sum(weights * logps), logps, d_hidden, d_kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _summed(plan: Plan, hidden, kernel, targets, weights):
    total, logps, _, _ = _run(plan, (False, False), hidden, kernel, targets, weights)  # not differentiated
    return total, logps


def _summed_fwd(plan: Plan, hidden, kernel, targets, weights):
    # symbolic_zeros: each primal says whether it is differentiated (a frozen LoRA base kernel is not).
    grads = (hidden.perturbed, kernel.perturbed)
    total, logps, d_hidden, d_kernel = _run(plan, grads, hidden.value, kernel.value, targets.value, weights.value)
    return (total, logps), (d_hidden, d_kernel)


def _summed_bwd(plan: Plan, residuals, cotangents):
    d_hidden, d_kernel = residuals
    g_total, _ = cotangents  # logps are returned without gradient
    if isinstance(g_total, jax.custom_derivatives.SymbolicZero):
        return None, None, None, None
    scale = lambda d: None if d is None else (d * g_total.astype(d.dtype)).astype(d.dtype)  # noqa: E731
    return scale(d_hidden), scale(d_kernel), None, None


_summed.defvjp(_summed_fwd, _summed_bwd, symbolic_zeros=True)
