"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

The returned log-prob is the one a training forward computes for the same
token: `log_softmax(logits / temperature)` over the whole vocabulary, before
top-k/top-p truncation (TRL's GRPO recomputes log-probs the same way, so the
sampler's values can stand in for the "old" policy's). Greedy uses temperature 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to decode. Hashable: the jitted sampler specialises on it.

    max_new_tokens: tokens generated per sample (the loop stops earlier once
        every row has produced a stop token).
    temperature, top_k (0 = off), top_p (1.0 = off): the sampling distribution.
    greedy: argmax decoding (temperature, top_k and top_p are ignored).
    stop_tokens: ids that end a sample (the model's EOS, the chat template's
        end-of-turn token, ...); the stop token is kept in the output.
    pad_token: written after a sample has stopped.
    num_samples: completions per prompt (rows of one prompt are contiguous).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop_tokens: tuple[int, ...] = ()
    pad_token: int = 0
    num_samples: int = 1

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); use greedy=True for argmax")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))


def truncate_logits(scaled: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Set logits outside the top-k / top-p (nucleus) set to -inf. [rows, vocab] float32."""
    if top_k and top_k < scaled.shape[-1]:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    if top_p < 1.0:
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token when the mass before it is below top_p: the most likely token always stays.
        keep_sorted = (jnp.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
        rows = jnp.arange(scaled.shape[0])[:, None]
        keep = jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)
        scaled = jnp.where(keep, scaled, -jnp.inf)
    return scaled


def choose_tokens(logits: jax.Array, key: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Next tokens [rows] int32 and their log-probs [rows] float32 from logits [rows, vocab]."""
    logits = logits.astype(jnp.float32)
    if params.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / params.temperature
        log_probs = jax.nn.log_softmax(scaled, axis=-1)
        tokens = jax.random.categorical(key, truncate_logits(scaled, params.top_k, params.top_p), axis=-1)
        tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
