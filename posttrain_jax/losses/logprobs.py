"""Per-token log-probabilities without materialising one-hot targets."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) from logits [..., vocab] and int targets [...]; float32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def token_logprobs_from_hidden(head: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array,
                               chunk_size: int | None = None) -> jax.Array:
    """log p(targets) [batch, length] from final hidden states [batch, length, hidden].

    With `chunk_size`, the LM head and softmax run over sequence chunks under
    `jax.checkpoint`, so neither pass keeps more than one chunk of logits
    (a 128k-262k vocabulary makes full logits the largest activation).
    """
    length = hidden.shape[1]
    if not chunk_size or chunk_size >= length:
        return token_logprobs(head(hidden), targets)
    if length % chunk_size:
        raise ValueError(f"loss chunk size {chunk_size} must divide the sequence length {length}")
    n = length // chunk_size
    h = jnp.moveaxis(hidden.reshape(hidden.shape[0], n, chunk_size, -1), 1, 0)
    t = jnp.moveaxis(targets.reshape(targets.shape[0], n, chunk_size), 1, 0)

    @jax.checkpoint
    def one(h_chunk, t_chunk):
        return token_logprobs(head(h_chunk), t_chunk)

    _, out = jax.lax.scan(lambda c, xs: (c, one(*xs)), None, (h, t))
    return jnp.moveaxis(out, 0, 1).reshape(targets.shape)
