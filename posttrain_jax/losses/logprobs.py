"""Per-token log-probabilities of targets: from logits, or fused with the LM head.

`fused_token_logprobs` is the one function every objective uses (SFT, DPO, the
RL objectives, eval). It goes from final hidden states and the LM head kernel
straight to log p(target) without ever holding [tokens, vocab] logits: a
`lax.scan` computes one chunk of logits at a time, and a `jax.custom_vjp`
recomputes each chunk's logits in the backward pass instead of keeping them (as
Liger's fused linear cross-entropy and MaxText's vocab tiling do). Under a mesh
with logical rules it runs inside `shard_map`: rows over the batch axes
(`data`, `fsdp`), vocabulary over the vocab axes (`tensor`), kernel hidden
dimension over its embed axes (`fsdp`). How the work is cut (`lm_head_chunks`):

- forward, kernel whole on each device (one device, data or tensor parallel):
  sequence chunks against the whole local vocabulary, logsumexp per chunk;
- forward, kernel's hidden dimension sharded (FSDP): vocabulary chunks against
  all rows, each chunk's kernel slice all-gathered on its own, with an online
  logsumexp (running max m, s = sum exp(z - m), t = sum exp(z - m) (z - m),
  rescaled when m grows, as in flash attention / Milakov & Gimelshein 2018);
- backward: vocabulary chunks against all rows, each kernel slice gathered on
  its own and its gradient reduce-scattered straight into this device's shard.
So neither the gathered kernel, nor the table's float32 gradient, nor
[tokens, vocab] logits ever exist whole on a device.

Math (float32, z = softcap(h @ W) / temperature over the vocabulary):
    log p(t) = z_t - logsumexp(z),   entropy = logsumexp(z) - sum_v p_v z_v,
    online: lse = m + log s,  entropy = log s - t / s,  log p(argmax) = -log s,
    d log p(t) / dz = onehot(t) - p,  d entropy / dz = -p (z - E_p[z]),
    dz/du = (1 - tanh^2(u / cap)) / temperature  (u = h @ W),
which is what autodiff of `token_logprobs(head(hidden) / T, targets)` gives.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from posttrain_jax.losses.lm_head_chunks import (DEFAULT_CHUNK_ELEMENTS, Plan, default_chunk_size,  # noqa: F401
                                                 chunk_logits, kernel_slice, on_mesh, plan_and_pad, psum_vocab,
                                                 reduce_kernel_grad, seq_chunk, vocab_ids)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) from logits [..., vocab] and int targets [...]; float32. The unfused reference."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


class TokenLogprobs(NamedTuple):
    """Per-token results of `fused_token_logprobs`, each [batch, length] float32.

    `entropy` (nats) is None unless asked for; `max_logps` (log p of the argmax token, no
    gradient) is None unless asked for: the target is the greedy token where `logps >= max_logps`.
    """

    logps: jax.Array
    entropy: jax.Array | None = None
    max_logps: jax.Array | None = None


def fused_token_logprobs(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *, vocab_major: bool,
                         softcap: float | None = None, temperature: float = 1.0, chunk_size: int | None = None,
                         with_entropy: bool = False, with_max: bool = False) -> TokenLogprobs:
    """log p(targets) of the LM head on `hidden`, one chunk of logits at a time.

    Args:
      hidden: final (normed) hidden states [batch, length, hidden], compute dtype.
      kernel: the LM head kernel in the compute dtype: [vocab, hidden] when `vocab_major`
        (an embedding tied to the head), else [hidden, vocab]. Logits are `hidden @ kernel`
        accumulated in float32.
      targets: int [batch, length] token ids in [0, vocab).
      softcap: Gemma's `final_logit_softcap`: logits -> cap * tanh(logits / cap).
      temperature: logits are divided by it after the softcap (GRPO scores samples under the
        sampling temperature, as TRL does).
      chunk_size: sequence positions per chunk; None or 0 picks `default_chunk_size` from the
        per-device rows and vocabulary. Need not divide `length` (the tail is padded). Where the
        kernel's hidden dimension is sharded (FSDP) the forward pass loops over the vocabulary
        instead, and chunk_size sets the same number of logits per chunk (all positions x a
        vocabulary slice of about chunk_size / length of the local vocabulary).
      with_entropy / with_max: also return the entropy / the argmax token's log-prob.

    Returns:
      `TokenLogprobs`, each [batch, length] float32. Gradients flow to `hidden` and `kernel`
      (and through `entropy` when asked for); equal to autodiff of the unfused
      `token_logprobs(softcap(hidden @ kernel) / temperature, targets)` up to float32 rounding.
    """
    plan, hidden, targets = plan_and_pad(hidden, kernel, targets, vocab_major=vocab_major, softcap=softcap,
                                         temperature=temperature, chunk_size=chunk_size,
                                         with_entropy=with_entropy, with_max=with_max)
    length = targets.shape[1] - plan.pad
    logps, entropy, max_logps = (x[:, :length] for x in _fused(plan, hidden, kernel, targets))
    return TokenLogprobs(logps, entropy if with_entropy else None,
                         jax.lax.stop_gradient(max_logps) if with_max else None)


def lm_head_logprobs(model, hidden: jax.Array, targets: jax.Array, *, temperature: float = 1.0,
                     chunk_size: int | None = None, with_entropy: bool = False,
                     with_max: bool = False) -> TokenLogprobs:
    """`fused_token_logprobs` with the kernel and softcap of a `Decoder` with an LM head."""
    if model.config.head != "lm":
        raise ValueError(f"log-probs need a model with an LM head, this one has head={model.config.head!r}")
    kernel, vocab_major = model.head_kernel()
    return fused_token_logprobs(hidden, kernel, targets, vocab_major=vocab_major,
                                softcap=model.config.final_logit_softcap, temperature=temperature,
                                chunk_size=chunk_size, with_entropy=with_entropy, with_max=with_max)


def _forward_local(plan: Plan, hidden, kernel, targets):
    """Forward for a kernel whole on this device: one sequence chunk at a time, the whole local vocabulary."""
    ids = vocab_ids(plan, kernel.shape[0 if plan.vocab_major else 1])

    def body(_, i):
        z, _ = chunk_logits(plan, seq_chunk(hidden, i, plan.chunk), kernel)
        hit = ids == seq_chunk(targets, i, plan.chunk)[..., None]
        top = jnp.max(z, axis=-1)
        if plan.vocab_axes:
            top = jax.lax.pmax(top, plan.vocab_axes)
        # logsumexp as jax.nn.logsumexp computes it: shifted by the (gradient-free) maximum
        lse = top + jnp.log(psum_vocab(plan, jnp.sum(jnp.exp(z - top[..., None]), axis=-1)))
        picked = psum_vocab(plan, jnp.sum(jnp.where(hit, z, 0.0), axis=-1))
        entropy = jnp.zeros_like(lse)
        if plan.with_entropy:  # -sum p log p over centred log p: no cancellation between large logits
            log_p = z - lse[..., None]
            entropy = -psum_vocab(plan, jnp.sum(jnp.exp(log_p) * log_p, axis=-1))
        return None, (picked - lse, lse, entropy, top - lse)

    _, outs = jax.lax.scan(body, None, jnp.arange(hidden.shape[1] // plan.chunk))
    # [chunks, rows, chunk] -> [rows, length]
    logps, lse, entropy, max_logps = (jnp.moveaxis(x, 0, 1).reshape(targets.shape) for x in outs)
    return logps, entropy, max_logps, lse


def _forward_vocab_local(plan: Plan, hidden, kernel, targets):
    """Forward for an FSDP-sharded kernel: one gathered vocabulary slice at a time, all rows at once.

    Online logsumexp: per position the running max m, s = sum exp(z - m) and (for the entropy)
    t = sum exp(z - m) (z - m) over the slices seen so far; a slice with a larger max rescales
    s and t (`_merge`). Every term is centred on a maximum, so large logits never cancel.
    """
    local_vocab, vc = kernel.shape[0 if plan.vocab_major else 1], plan.vocab_chunk
    ids = vocab_ids(plan, local_vocab)

    def body(carry, j):
        stats, picked = carry
        z, _ = chunk_logits(plan, hidden, kernel_slice(plan, kernel, j * vc, vc))
        top = jnp.max(z, axis=-1)
        shifted = z - top[..., None]
        e = jnp.exp(shifted)
        chunk = (top, jnp.sum(e, axis=-1), jnp.sum(e * shifted, axis=-1) if plan.with_entropy else None)
        hit = jax.lax.dynamic_slice_in_dim(ids, j * vc, vc) == targets[..., None]
        picked = picked + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
        return (_merge(stats, chunk), picked), None

    zeros = jnp.zeros(targets.shape, jnp.promote_types(hidden.dtype, jnp.float32))
    empty = (jnp.full_like(zeros, -jnp.inf), zeros, zeros if plan.with_entropy else None)
    ((m, s, t), picked), _ = jax.lax.scan(body, (empty, zeros), jnp.arange(local_vocab // vc))
    if plan.vocab_axes:  # every device saw at least one slice, so m is finite here
        top = jax.lax.pmax(m, plan.vocab_axes)
        scale = jnp.exp(m - top)
        if plan.with_entropy:
            t = jax.lax.psum(scale * (t + (m - top) * s), plan.vocab_axes)
        m, s, picked = top, jax.lax.psum(scale * s, plan.vocab_axes), jax.lax.psum(picked, plan.vocab_axes)
    log_s = jnp.log(s)
    lse = m + log_s
    entropy = log_s - t / s if plan.with_entropy else jnp.zeros_like(lse)
    return picked - lse, entropy, -log_s, lse  # log p(argmax) = m - lse = -log s


def _merge(a, b):
    """Online-logsumexp statistics (m, s, t) of two disjoint vocabulary parts merged into one.

    With M = max(m_a, m_b): s = sum_parts e^(m - M) s, t = sum_parts e^(m - M) (t + (m - M) s),
    since exp(z - M)(z - M) = e^(m - M) exp(z - m)((z - m) + (m - M)). `a` may be the empty start
    (m = -inf, s = t = 0); t is None when the entropy is not wanted.
    """
    (m_a, s_a, t_a), (m_b, s_b, t_b) = a, b
    top = jnp.maximum(m_a, m_b)
    d_a, d_b = m_a - top, m_b - top
    e_a, e_b = jnp.exp(d_a), jnp.exp(d_b)
    t = None
    if t_a is not None:  # (the empty start has d_a = -inf and s_a = 0: its term is 0, not nan)
        t = e_a * (t_a + jnp.where(s_a > 0, d_a * s_a, 0.0)) + e_b * (t_b + d_b * s_b)
    return top, e_a * s_a + e_b * s_b, t


def _forward(plan: Plan, hidden, kernel, targets):
    local = _forward_vocab_local if plan.vocab_forward else _forward_local
    return on_mesh(plan, functools.partial(local, plan), "rkr", "rrrr")(hidden, kernel, targets)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(plan: Plan, hidden, kernel, targets):
    return _forward(plan, hidden, kernel, targets)[:3]


def _fused_fwd(plan: Plan, hidden, kernel, targets):
    logps, entropy, max_logps, lse = _forward(plan, hidden, kernel, targets)
    return (logps, entropy, max_logps), (hidden, kernel, targets, lse, entropy)


def _fused_bwd(plan: Plan, residuals, cotangents):
    g_logps, g_entropy, _ = cotangents  # max_logps carries no gradient
    backward = on_mesh(plan, functools.partial(_backward_local, plan), "rkrrrrr", "rk")
    d_hidden, d_kernel = backward(*residuals, g_logps, g_entropy)
    return d_hidden, d_kernel, None


def _backward_local(plan: Plan, hidden, kernel, targets, lse, entropy, g_logps, g_entropy):
    """Gradients for this device, one vocabulary chunk at a time (all rows of each chunk at once).

    Looping over the vocabulary rather than the sequence finishes each kernel-gradient slice in
    one step, so it is reduce-scattered straight into this device's shard, and each step gathers
    only its own kernel slice: neither the gathered kernel nor a float32 gradient of it ever exists
    whole; the only accumulator is d hidden, [rows, length, hidden].
    """
    vocab_dim = 0 if plan.vocab_major else 1
    embed_dim = 1 - vocab_dim
    local_vocab, vc = kernel.shape[vocab_dim], plan.vocab_chunk
    ids = vocab_ids(plan, local_vocab)
    acc = jnp.promote_types(hidden.dtype, jnp.float32)  # float32 accumulation (float64 in x64 tests)
    h_spec, w_spec = ("btv,vh->bth", "bth,btv->vh") if plan.vocab_major else ("btv,hv->bth", "bth,btv->hv")
    lse, g = lse[..., None], g_logps[..., None]
    entropy_weight = None
    if plan.with_entropy:  # d entropy / dz = -p (z - E_p[z]) = -p (log p + entropy)
        entropy_weight = g_entropy[..., None]

    def body(carry, j):
        d_hidden, d_kernel = carry
        w_chunk = kernel_slice(plan, kernel, j * vc, vc)
        z, slope = chunk_logits(plan, hidden, w_chunk)
        log_p = z - lse
        weight = g if entropy_weight is None else g + entropy_weight * (log_p + entropy[..., None])
        hit = jax.lax.dynamic_slice_in_dim(ids, j * vc, vc) == targets[..., None]
        d_z = jnp.where(hit, g, 0.0) - jnp.exp(log_p) * weight
        if slope is not None:
            d_z = d_z * slope
        if plan.temperature != 1.0:
            d_z = d_z / plan.temperature
        d_z = d_z.astype(kernel.dtype)
        d_hidden = d_hidden + jnp.einsum(h_spec, d_z, w_chunk, preferred_element_type=acc)
        d_chunk = reduce_kernel_grad(plan, jnp.einsum(w_spec, hidden, d_z, preferred_element_type=acc), embed_dim)
        d_kernel = jax.lax.dynamic_update_slice_in_dim(d_kernel, d_chunk.astype(kernel.dtype), j * vc, vocab_dim)
        return (d_hidden, d_kernel), None

    init = (jnp.zeros(hidden.shape, acc), jnp.zeros_like(kernel))
    (d_hidden, d_kernel), _ = jax.lax.scan(body, init, jnp.arange(local_vocab // vc))
    return psum_vocab(plan, d_hidden).astype(hidden.dtype), d_kernel


_fused.defvjp(_fused_fwd, _fused_bwd)
