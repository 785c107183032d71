"""Token-level distillation losses on teacher logits: forward KL, reverse KL, generalised JSD.

With student and teacher distributions over the vocabulary at temperature tau,
S = softmax(z_s / tau) and T = softmax(z_t / tau), the per-token loss is the
generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy
Distillation of Language Models", eq. 4), as TRL's `GKDTrainer.generalized_jsd_loss`
computes it:

    M = beta * T + (1 - beta) * S
    JSD_beta(T, S) = beta * KL(T || M) + (1 - beta) * KL(S || M)

with the limits taken exactly: beta = 0 is the forward KL(T || S) (mode-covering,
classic distillation) and beta = 1 the reverse KL(S || T) (mode-seeking).
TRL's `beta` has this meaning (0 forward, 1 reverse); "forward_kl" and
"reverse_kl" here are beta 0 and 1.

Every function returns the divergence per token, [batch, length] float32,
summed over the vocabulary (TRL's "batchmean" reduction is then
sum(loss * mask) / sum(mask); the trainer applies SFT's aggregation weights
instead). Math is in float32.

Top-k teacher: `teacher_topk` keeps the k most likely teacher tokens and their
log-probs at temperature tau (small enough to cache on disk); `topk_divergence`
restricts both distributions to those k tokens and renormalises each over
them before the same divergence, so with k = vocabulary it equals the full loss.

`*_from_hidden` variants run the LM heads and the loss over sequence chunks under
`jax.checkpoint`, so no [tokens, vocab] array outlives one chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

DIVERGENCES = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": None}


def divergence_beta(divergence: str, beta: float) -> float:
    """The JSD beta of a named divergence ("jsd" uses `beta`). Raises ValueError for unknown names / beta."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {list(DIVERGENCES)}")
    value = DIVERGENCES[divergence]
    if value is None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
        value = float(beta)
    return value


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(P || Q) over the last axis from log-probs; 0 * log 0 terms are 0."""
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def generalized_jsd(student_logps: jax.Array, teacher_logps: jax.Array, beta: float) -> jax.Array:
    """JSD_beta(T, S) per position from normalised log-probs [..., support] -> [...] (see the module docstring)."""
    s, t = student_logps.astype(jnp.float32), teacher_logps.astype(jnp.float32)
    if beta == 0.0:
        return _kl(t, s)
    if beta == 1.0:
        return _kl(s, t)
    mixture = jnp.logaddexp(s + jnp.log1p(-beta), t + jnp.log(beta))
    return beta * _kl(t, mixture) + (1.0 - beta) * _kl(s, mixture)


def token_divergence(student_logits: jax.Array, teacher_logits: jax.Array, *, beta: float,
                     temperature: float = 1.0) -> jax.Array:
    """Per-token JSD_beta of softmax(logits / temperature): logits [batch, length, vocab] -> [batch, length]."""
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    return generalized_jsd(s, t, beta)


def teacher_topk(teacher_logits: jax.Array, k: int, *, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The k most likely teacher tokens: (log-probs [..., k] float32 at `temperature`, over the whole
    vocabulary, and their ids [..., k] int32), most likely first."""
    logps = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    values, ids = jax.lax.top_k(logps, k)
    return values, ids.astype(jnp.int32)


def topk_divergence(student_logits: jax.Array, teacher_logps: jax.Array, teacher_ids: jax.Array, *, beta: float,
                    temperature: float = 1.0) -> jax.Array:
    """JSD_beta restricted to the teacher's top-k tokens, both sides renormalised over them. [batch, length]."""
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jnp.take_along_axis(s, teacher_ids, axis=-1)
    s = s - jax.nn.logsumexp(s, axis=-1, keepdims=True)
    t = teacher_logps.astype(jnp.float32)
    t = t - jax.nn.logsumexp(t, axis=-1, keepdims=True)
    return generalized_jsd(s, t, beta)


def _chunked(fn: Callable, length: int, chunk_size: int | None, *arrays: jax.Array) -> jax.Array:
    """fn(*chunks) -> [batch, chunk] over sequence chunks of every [batch, length, ...] array, rematerialised."""
    if not chunk_size or chunk_size >= length:
        return fn(*arrays)
    if length % chunk_size:
        raise ValueError(f"loss chunk size {chunk_size} must divide the sequence length {length}")
    n = length // chunk_size
    split = [jnp.moveaxis(a.reshape(a.shape[0], n, chunk_size, *a.shape[2:]), 1, 0) for a in arrays]
    one = jax.checkpoint(fn)
    _, out = jax.lax.scan(lambda c, xs: (c, one(*xs)), None, split)
    return jnp.moveaxis(out, 0, 1).reshape(arrays[0].shape[0], length)


def token_divergence_from_hidden(student_head: Callable, student_hidden: jax.Array, teacher_head: Callable,
                                 teacher_hidden: jax.Array, *, beta: float, temperature: float = 1.0,
                                 vocab_size: int | None = None, chunk_size: int | None = None) -> jax.Array:
    """`token_divergence` from final hidden states [batch, length, hidden_s/t] through both LM heads.

    vocab_size: compare only the first `vocab_size` logits (the tokenizer's vocabulary, when student and
    teacher pad their embedding tables differently, e.g. Qwen2.5 0.5B vs 7B).
    """
    def fn(hs, ht):
        zs, zt = student_head(hs), teacher_head(ht)
        if vocab_size is not None:
            zs, zt = zs[..., :vocab_size], zt[..., :vocab_size]
        return token_divergence(zs, zt, beta=beta, temperature=temperature)
    return _chunked(fn, student_hidden.shape[1], chunk_size, student_hidden, teacher_hidden)


def topk_divergence_from_hidden(student_head: Callable, student_hidden: jax.Array, teacher_logps: jax.Array,
                                teacher_ids: jax.Array, *, beta: float, temperature: float = 1.0,
                                chunk_size: int | None = None) -> jax.Array:
    """`topk_divergence` from student hidden states [batch, length, hidden] and cached top-k teacher arrays."""
    def fn(hs, lp, ids):
        return topk_divergence(student_head(hs), lp, ids, beta=beta, temperature=temperature)
    return _chunked(fn, student_hidden.shape[1], chunk_size, student_hidden, teacher_logps, teacher_ids)
