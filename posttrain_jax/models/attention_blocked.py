"""Blocked (flash-style) self-attention in pure JAX: memory O(block^2) per step, forward and backward.

The forward pass walks query blocks one after another; for each it runs an online
softmax over only the key blocks the mask can reach (causal: none after the query
block; sliding window: none before it), so [T, T] scores never exist and fully
masked blocks cost nothing. The backward pass is a `jax.custom_vjp` that keeps only
q, k, v, the output and the per-row log-sum-exp, and recomputes each block's
probabilities twice (once walking query blocks for dq, once walking key blocks for
dk and dv), as in FlashAttention-2 (Dao 2023, "FlashAttention-2", Algorithm 2).

The mask is the oracle's (`attention.attention_mask` over slots 0..T-1): a query
sees a key iff key slot <= query slot, both carry the same segment id, the key's
segment id is not 0 (padding) and, with a window W, query slot - key slot < W.
Rows with no visible key (padding queries) return zeros.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Finite, as in the oracle: exp(_MASK_VALUE - m) underflows to exactly 0 for any real score m.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


class BlockedSpec(NamedTuple):
    """Static numerics of one attention call (hashable: a `nondiff_argnums` argument)."""

    scale: float
    softcap: float | None
    window: int | None
    block: int


def _kv_block_range(i, spec: BlockedSpec, num_blocks: int):
    """Key blocks [lo, hi] that query block `i` can see (equal-size blocks, self-attention)."""
    hi = i  # causal: nothing after the query block
    lo = 0 if spec.window is None else jnp.maximum(0, (i * spec.block - spec.window + 1) // spec.block)
    return lo, hi


def _q_block_range(j, spec: BlockedSpec, num_blocks: int):
    """Query blocks [lo, hi] that can see key block `j`."""
    lo = j
    if spec.window is None:
        return lo, num_blocks - 1
    hi = jnp.minimum(num_blocks - 1, (spec.window + (j + 1) * spec.block - 2) // spec.block)
    return lo, hi


def _block_mask(i, j, q_seg_i, kv_seg_j, spec: BlockedSpec):
    """[batch, 1, 1, bq, bk] bool for query block i against key block j."""
    b = spec.block
    q_slots = i * b + jnp.arange(b, dtype=jnp.int32)
    k_slots = j * b + jnp.arange(b, dtype=jnp.int32)
    visible = k_slots[None, :] <= q_slots[:, None]
    if spec.window is not None:
        visible &= q_slots[:, None] - k_slots[None, :] < spec.window
    mask = visible[None] & (q_seg_i[:, :, None] == kv_seg_j[:, None, :]) & (kv_seg_j != 0)[:, None, :]
    return mask[:, None, None]


def _scores(q_i, k_j, spec: BlockedSpec):
    """Scaled (and soft-capped) float32 scores [batch, kv_heads, groups, bq, bk]; also tanh for the vjp."""
    raw = jnp.einsum("bqkgd,bskd->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * spec.scale
    if spec.softcap is None:
        return raw, None
    capped = jnp.tanh(raw / spec.softcap)
    return capped * spec.softcap, capped


def _slice(x, i, block, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=axis)


def _unblock(blocks):
    """[num_blocks, batch, block, ...] -> [batch, num_blocks * block, ...]."""
    n, b, blk = blocks.shape[:3]
    return jnp.moveaxis(blocks, 0, 1).reshape(b, n * blk, *blocks.shape[3:])


def _forward(q, k, v, q_seg, kv_seg, spec: BlockedSpec):
    """Output [B, T, K, G, D] (q's dtype) and log-sum-exp [B, K, G, T] (float32)."""
    batch, length, kv_heads, groups, dim = q.shape
    nb = length // spec.block

    def one_query_block(i):
        q_i, q_seg_i = _slice(q, i, spec.block), _slice(q_seg, i, spec.block)
        shape = (batch, kv_heads, groups, spec.block)

        def body(j, carry):
            m, l, acc = carry
            k_j, v_j, kv_seg_j = _slice(k, j, spec.block), _slice(v, j, spec.block), _slice(kv_seg, j, spec.block)
            mask = _block_mask(i, j, q_seg_i, kv_seg_j, spec)
            s = jnp.where(mask, _scores(q_i, k_j, spec)[0], _MASK_VALUE)
            m_new = jnp.maximum(m, s.max(-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            l = alpha * l + p.sum(-1)
            pv = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
            acc = acc * jnp.moveaxis(alpha, 3, 1)[..., None] + pv
            return m_new, l, acc

        lo, hi = _kv_block_range(i, spec, nb)
        init = (jnp.full(shape, _MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros((batch, spec.block, kv_heads, groups, dim), jnp.float32))
        m, l, acc = jax.lax.fori_loop(lo, hi + 1, body, init)
        seen = l > 0  # padding queries see no key: zeros, and a log-sum-exp that is never used
        out = acc / jnp.moveaxis(jnp.where(seen, l, 1.0), 3, 1)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return out.astype(q.dtype), lse

    out_blocks, lse_blocks = jax.lax.map(one_query_block, jnp.arange(nb))
    lse = jnp.moveaxis(lse_blocks, 0, 3).reshape(batch, kv_heads, groups, length)
    return _unblock(out_blocks), lse


def _probs_and_dscores(q_i, k_j, v_j, do_i, lse_i, delta_i, mask, spec: BlockedSpec):
    """Recomputed probabilities and d(loss)/d(raw scaled scores), [B, K, G, bq, bk] float32."""
    s, capped = _scores(q_i, k_j, spec)
    p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
    dp = jnp.einsum("bqkgd,bskd->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_i[..., None])
    if capped is not None:  # d tanh(x / c) * c / dx = 1 - tanh^2
        ds = ds * (1.0 - capped * capped)
    return p, ds


def _backward(spec: BlockedSpec, residuals, d_out):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    batch, length, kv_heads, groups, dim = q.shape
    nb = length // spec.block
    # delta_i = sum_d dO_i * O_i = sum_j P_ij dP_ij (the softmax backward's row term), float32.
    delta = jnp.einsum("btkgd,btkgd->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    d_out = d_out.astype(q.dtype)

    def dq_block(i):
        q_i, q_seg_i, do_i = _slice(q, i, spec.block), _slice(q_seg, i, spec.block), _slice(d_out, i, spec.block)
        lse_i, delta_i = _slice(lse, i, spec.block, axis=3), _slice(delta, i, spec.block, axis=3)

        def body(j, dq):
            k_j, v_j, kv_seg_j = _slice(k, j, spec.block), _slice(v, j, spec.block), _slice(kv_seg, j, spec.block)
            mask = _block_mask(i, j, q_seg_i, kv_seg_j, spec)
            _, ds = _probs_and_dscores(q_i, k_j, v_j, do_i, lse_i, delta_i, mask, spec)
            return dq + jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(k.dtype), k_j, preferred_element_type=jnp.float32)

        lo, hi = _kv_block_range(i, spec, nb)
        dq = jax.lax.fori_loop(lo, hi + 1, body, jnp.zeros(q_i.shape, jnp.float32))
        return (dq * spec.scale).astype(q.dtype)

    def dkv_block(j):
        k_j, v_j, kv_seg_j = _slice(k, j, spec.block), _slice(v, j, spec.block), _slice(kv_seg, j, spec.block)

        def body(i, carry):
            dk, dv = carry
            q_i, q_seg_i, do_i = _slice(q, i, spec.block), _slice(q_seg, i, spec.block), _slice(d_out, i, spec.block)
            lse_i, delta_i = _slice(lse, i, spec.block, axis=3), _slice(delta, i, spec.block, axis=3)
            mask = _block_mask(i, j, q_seg_i, kv_seg_j, spec)
            p, ds = _probs_and_dscores(q_i, k_j, v_j, do_i, lse_i, delta_i, mask, spec)
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(v.dtype), do_i, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(q.dtype), q_i, preferred_element_type=jnp.float32)
            return dk, dv

        lo, hi = _q_block_range(j, spec, nb)
        zeros = jnp.zeros(k_j.shape, jnp.float32)
        dk, dv = jax.lax.fori_loop(lo, hi + 1, body, (zeros, zeros))
        return (dk * spec.scale).astype(k.dtype), dv.astype(v.dtype)

    dq = _unblock(jax.lax.map(dq_block, jnp.arange(nb)))
    dk_blocks, dv_blocks = jax.lax.map(dkv_block, jnp.arange(nb))
    return dq, _unblock(dk_blocks), _unblock(dv_blocks), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blocked(q, k, v, q_seg, kv_seg, spec: BlockedSpec):
    return _forward(q, k, v, q_seg, kv_seg, spec)[0]


def _blocked_fwd(q, k, v, q_seg, kv_seg, spec: BlockedSpec):
    out, lse = _forward(q, k, v, q_seg, kv_seg, spec)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


_blocked.defvjp(_blocked_fwd, _backward)


def blocked_attention(q, k, v, segment_ids, *, scale: float, softcap: float | None = None,
                      window: int | None = None, block: int = 512) -> jax.Array:
    """Causal self-attention over segment ids without a [T, T] tensor, forward or backward.

    q: [batch, T, heads, head_dim]; k, v: [batch, T, kv_heads, head_dim] (heads a multiple of
    kv_heads; query head h reads kv head h // (heads // kv_heads)); segment_ids: [batch, T]
    int, 0 = padding. scale multiplies q.k; softcap (Gemma 2 style) caps the scaled scores as
    tanh(s / softcap) * softcap; window W keeps keys with query slot - key slot < W.
    block: query and key block length (T is padded up to a multiple; padding is masked).
    Returns [batch, T, heads, head_dim] in q's dtype; softmax statistics and accumulation
    are float32. Rows whose segment id is 0 are zeros.
    """
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"blocked_attention: {heads} query heads is not a multiple of {kv_heads} kv heads")
    if k.shape[1] != length:
        raise ValueError(f"blocked_attention is self-attention: q has {length} slots, k has {k.shape[1]}")
    block = max(1, min(int(block), length))
    padded = -(-length // block) * block
    segment_ids = segment_ids.astype(jnp.int32)
    if padded != length:  # padding slots carry segment 0: never seen, and their rows are dropped below
        pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        segment_ids = jnp.pad(segment_ids, [(0, 0), (0, padded - length)])
    spec = BlockedSpec(float(scale), None if softcap is None else float(softcap),
                       None if window is None else int(window), block)
    q5 = q.reshape(batch, padded, kv_heads, heads // kv_heads, dim)
    out = _blocked(q5, k, v, segment_ids, segment_ids, spec)
    return out.reshape(batch, padded, heads, dim)[:, :length]
