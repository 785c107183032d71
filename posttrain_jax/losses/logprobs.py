"""Per-token log-probabilities of targets: from logits, or fused with the LM head.

`fused_token_logprobs` is the one function every objective uses (SFT, DPO, the
RL objectives, eval). It goes from final hidden states and the LM head kernel
straight to log p(target) without ever holding [tokens, vocab] logits: the
sequence is cut into chunks, a `lax.scan` computes one chunk's logits at a
time, and a `jax.custom_vjp` recomputes each chunk's logits in the backward
pass instead of keeping them (as Liger's fused linear cross-entropy and
MaxText's vocab tiling do). Under a mesh with logical rules it runs inside
`shard_map`: rows over the batch axes (`data`, `fsdp`), vocabulary over the
vocab axes (`tensor`), the kernel gathered over its embed axes once per call
and its gradient reduce-scattered back, so neither the table nor its float32
gradient is ever replicated.

Math (float32, z = softcap(h @ W) / temperature over the vocabulary):
    log p(t) = z_t - logsumexp(z),   entropy = logsumexp(z) - sum_v p_v z_v,
    d log p(t) / dz = onehot(t) - p,  d entropy / dz = -p (z - E_p[z]),
    dz/du = (1 - tanh^2(u / cap)) / temperature  (u = h @ W),
which is what autodiff of `token_logprobs(head(hidden) / T, targets)` gives.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from posttrain_jax.sharding import active_rules, logical_to_spec

# Logits elements per device in one chunk (128 MiB in float32). Big enough that each chunk's matmul
# runs at full speed on CPU and TPU (>= 128 rows x the vocabulary, or all rows x >= 8k entries at
# 16k rows), small enough that a 128k-262k vocabulary costs well under 1 GiB of temporaries.
DEFAULT_CHUNK_ELEMENTS = 2**25


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


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one fused call (hashable: a custom_vjp non-diff argument)."""

    vocab_major: bool  # kernel is [vocab, hidden] (tied embedding) rather than [hidden, vocab]
    softcap: float | None
    temperature: float
    chunk: int  # sequence positions per forward chunk
    vocab_chunk: int  # vocabulary entries (per device) per backward chunk
    with_entropy: bool
    with_max: bool
    pad: int = 0  # positions appended to make whole chunks (dropped from the results)
    batch_axes: tuple[str, ...] = ()  # mesh axes splitting rows (inside shard_map)
    vocab_axes: tuple[str, ...] = ()  # mesh axes splitting the vocabulary
    embed_axes: tuple[str, ...] = ()  # mesh axes splitting the kernel's hidden dimension
    embed_shards: int = 1
    mesh: object = None  # the (abstract) mesh for shard_map; None: plain arrays on one device or GSPMD


def default_chunk_size(rows: int, length: int, vocab: int, budget: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Sequence positions per chunk: the largest power of two with rows x chunk x vocab <= budget.

    `rows` and `vocab` are per device. Capped at `length` (one chunk when everything fits).
    """
    if rows * length * vocab <= budget:
        return length
    chunk = 1
    while chunk * 2 < length and rows * chunk * 2 * vocab <= budget:
        chunk *= 2
    return chunk


def fused_token_logprobs(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *, vocab_major: bool,
                         softcap: float | None = None, temperature: float = 1.0, chunk_size: int | None = None,
                         with_entropy: bool = False, with_max: bool = False) -> TokenLogprobs:
    """log p(targets) of the LM head on `hidden`, one sequence chunk of logits at a time.

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
        per-device rows and vocabulary. Need not divide `length` (the tail is padded).
      with_entropy / with_max: also return the entropy / the argmax token's log-prob.

    Returns:
      `TokenLogprobs`, each [batch, length] float32. Gradients flow to `hidden` and `kernel`
      (and through `entropy` when asked for); equal to autodiff of the unfused
      `token_logprobs(softcap(hidden @ kernel) / temperature, targets)` up to float32 rounding.
    """
    plan, hidden, targets = _plan_and_pad(hidden, kernel, targets, vocab_major=vocab_major, softcap=softcap,
                                          temperature=temperature, chunk_size=chunk_size,
                                          with_entropy=with_entropy, with_max=with_max)
    length = targets.shape[1] - plan.pad
    logps, entropy, max_logps = (x[:, :length] for x in _fused(plan, hidden, kernel, targets))
    return TokenLogprobs(logps, entropy if with_entropy else None,
                         jax.lax.stop_gradient(max_logps) if with_max else None)


def _plan_and_pad(hidden, kernel, targets, *, vocab_major: bool, softcap, temperature, chunk_size,
                  with_entropy: bool = False, with_max: bool = False, min_chunk_tokens: int = 1):
    """Check the shapes, pick the chunks and the mesh layout; pad hidden / targets to whole chunks.
    An automatic chunk is doubled until it holds `min_chunk_tokens` (rows x positions per device)."""
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [batch, length, hidden] and targets [batch, length]; got "
                         f"{hidden.shape} and {targets.shape}")
    vocab_dim = 0 if vocab_major else 1
    if kernel.ndim != 2 or kernel.shape[1 - vocab_dim] != hidden.shape[-1]:
        raise ValueError(f"kernel {kernel.shape} does not match hidden size {hidden.shape[-1]} "
                         f"({'[vocab, hidden]' if vocab_major else '[hidden, vocab]'} expected)")
    if chunk_size is not None and chunk_size < 0:
        raise ValueError(f"loss chunk size must be >= 0 (0 = automatic), got {chunk_size}")
    axes = _mesh_axes(hidden.shape[0], kernel.shape, vocab_major)
    rows, vocab = hidden.shape[0], kernel.shape[vocab_dim]
    if axes is not None:
        mesh, batch_axes, vocab_axes, embed_axes = axes
        rows //= _size(mesh, batch_axes)
        vocab //= _size(mesh, vocab_axes)
    length = hidden.shape[1]
    chunk = min(chunk_size, length) if chunk_size else default_chunk_size(rows, length, vocab)
    while not chunk_size and chunk < length and rows * chunk < min_chunk_tokens:
        chunk *= 2
    padded = -(-length // chunk) * chunk  # a whole number of chunks; padded positions are dropped by the caller
    vocab_chunk = _largest_divisor(vocab, max(1, DEFAULT_CHUNK_ELEMENTS // (rows * padded)))
    plan = _Plan(vocab_major, None if softcap is None else float(softcap), float(temperature), chunk,
                 vocab_chunk, with_entropy, with_max, pad=padded - length)
    if axes is not None:
        plan = dataclasses.replace(plan, batch_axes=batch_axes, vocab_axes=vocab_axes, embed_axes=embed_axes,
                                   embed_shards=_size(mesh, embed_axes), mesh=mesh)
    targets = targets.astype(jnp.int32)
    if padded != length:
        hidden = jnp.pad(hidden, ((0, 0), (0, padded - length), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, padded - length)))
    return plan, hidden, targets


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


def _largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of n that is <= limit."""
    return max(d for k in range(1, int(n**0.5) + 1) if n % k == 0 for d in (k, n // k) if d <= limit)


def _size(mesh, names: tuple[str, ...]) -> int:
    out = 1
    for name in names:
        out *= mesh.shape[name]
    return out


def _mesh_axes(rows: int, kernel_shape, vocab_major: bool):
    """(mesh, batch, vocab, embed mesh axes) for the shard_map path, or None for the plain one."""
    rules, mesh = active_rules(), jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty or mesh.size == 1 or jax.sharding.AxisType.Explicit in mesh.axis_types:
        return None  # (explicit-sharding meshes take the plain path: their types carry the layout)

    def axes(names):
        return tuple(() if a is None else (a,) if isinstance(a, str) else tuple(a)
                     for a in logical_to_spec(names, rules, mesh.axis_names))

    (batch_axes,) = axes(("batch",))
    if vocab_major:
        vocab_axes, embed_axes = axes(("vocab", "embed"))
    else:
        embed_axes, vocab_axes = axes(("embed", "vocab"))
    vocab, embed = (kernel_shape if vocab_major else kernel_shape[::-1])
    if (set(batch_axes) & set(vocab_axes) or rows % _size(mesh, batch_axes) or vocab % _size(mesh, vocab_axes)
            or embed % _size(mesh, embed_axes)):
        return None  # an unusual layout: let GSPMD partition the plain computation
    return mesh, batch_axes, vocab_axes, embed_axes


def _on_mesh(plan: _Plan, fn, args: str, outs: str):
    """`fn` per device under shard_map; `args` / `outs` name each array's layout: r = rows, k = kernel.

    The custom_vjp sits outside the shard_map (its forward and backward are each one shard_map), so
    every collective of the backward pass is written here, none inserted by a shard_map transpose.
    """
    if plan.mesh is None:
        return fn
    rows = jax.P(plan.batch_axes or None)
    vocab, embed = plan.vocab_axes or None, plan.embed_axes or None
    kernel = jax.P(vocab, embed) if plan.vocab_major else jax.P(embed, vocab)
    spec = {"r": rows, "k": kernel}
    return jax.shard_map(fn, mesh=plan.mesh, check_vma=False, in_specs=tuple(spec[a] for a in args),
                         out_specs=tuple(spec[a] for a in outs))


def _full_kernel(plan: _Plan, kernel):
    """The kernel with its whole hidden dimension on this device (FSDP all-gather)."""
    if not plan.embed_axes:
        return kernel
    return jax.lax.all_gather(kernel, plan.embed_axes, axis=1 if plan.vocab_major else 0, tiled=True)


def _logits(plan: _Plan, h, w):
    """(z, dz/du) for one chunk: h [rows, chunk, hidden] -> float32 [rows, chunk, local vocab]."""
    spec = "bch,vh->bcv" if plan.vocab_major else "bch,hv->bcv"
    z = jnp.einsum(spec, h, w, preferred_element_type=jnp.promote_types(h.dtype, jnp.float32))
    slope = None
    if plan.softcap is not None:
        capped = jnp.tanh(z / plan.softcap)
        z, slope = capped * plan.softcap, 1.0 - capped * capped
    if plan.temperature != 1.0:
        z = z / plan.temperature
    return z, slope


def _vocab_ids(plan: _Plan, local_vocab: int):
    offset = jax.lax.axis_index(plan.vocab_axes) * local_vocab if plan.vocab_axes else 0
    return jnp.arange(local_vocab, dtype=jnp.int32) + offset


def _psum(plan: _Plan, x):
    return jax.lax.psum(x, plan.vocab_axes) if plan.vocab_axes else x


def _chunk(x, i, chunk):
    return jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)


def _forward_local(plan: _Plan, hidden, kernel, targets):
    w = _full_kernel(plan, kernel)
    ids = _vocab_ids(plan, w.shape[0 if plan.vocab_major else 1])

    def body(_, i):
        z, _ = _logits(plan, _chunk(hidden, i, plan.chunk), w)
        hit = ids == _chunk(targets, i, plan.chunk)[..., None]
        top = jnp.max(z, axis=-1)
        if plan.vocab_axes:
            top = jax.lax.pmax(top, plan.vocab_axes)
        # logsumexp as jax.nn.logsumexp computes it: shifted by the (gradient-free) maximum
        lse = top + jnp.log(_psum(plan, jnp.sum(jnp.exp(z - top[..., None]), axis=-1)))
        picked = _psum(plan, jnp.sum(jnp.where(hit, z, 0.0), axis=-1))
        entropy = jnp.zeros_like(lse)
        if plan.with_entropy:  # -sum p log p over centred log p: no cancellation between large logits
            log_p = z - lse[..., None]
            entropy = -_psum(plan, jnp.sum(jnp.exp(log_p) * log_p, axis=-1))
        return None, (picked - lse, lse, entropy, top - lse)

    _, outs = jax.lax.scan(body, None, jnp.arange(hidden.shape[1] // plan.chunk))
    # [chunks, rows, chunk] -> [rows, length]
    logps, lse, entropy, max_logps = (jnp.moveaxis(x, 0, 1).reshape(targets.shape) for x in outs)
    return logps, entropy, max_logps, lse


def _forward(plan: _Plan, hidden, kernel, targets):
    return _on_mesh(plan, functools.partial(_forward_local, plan), "rkr", "rrrr")(hidden, kernel, targets)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(plan: _Plan, hidden, kernel, targets):
    return _forward(plan, hidden, kernel, targets)[:3]


def _fused_fwd(plan: _Plan, hidden, kernel, targets):
    logps, entropy, max_logps, lse = _forward(plan, hidden, kernel, targets)
    return (logps, entropy, max_logps), (hidden, kernel, targets, lse, entropy)


def _fused_bwd(plan: _Plan, residuals, cotangents):
    g_logps, g_entropy, _ = cotangents  # max_logps carries no gradient
    backward = _on_mesh(plan, functools.partial(_backward_local, plan), "rkrrrrr", "rk")
    d_hidden, d_kernel = backward(*residuals, g_logps, g_entropy)
    return d_hidden, d_kernel, None


def _backward_local(plan: _Plan, hidden, kernel, targets, lse, entropy, g_logps, g_entropy):
    """Gradients for this device, one vocabulary chunk at a time (all rows of each chunk at once).

    Looping over the vocabulary rather than the sequence finishes each kernel-gradient slice in
    one step, so it is reduce-scattered straight into this device's shard: no float32 gradient of
    the whole (gathered) kernel ever exists; the only accumulator is d hidden, [rows, length, hidden].
    """
    w = _full_kernel(plan, kernel)
    vocab_dim = 0 if plan.vocab_major else 1
    embed_dim = 1 - vocab_dim
    local_vocab, vc = w.shape[vocab_dim], plan.vocab_chunk
    ids = _vocab_ids(plan, local_vocab)
    acc = jnp.promote_types(hidden.dtype, jnp.float32)  # float32 accumulation (float64 in x64 tests)
    h_spec, w_spec = ("btv,vh->bth", "bth,btv->vh") if plan.vocab_major else ("btv,hv->bth", "bth,btv->hv")
    lse, g = lse[..., None], g_logps[..., None]
    entropy_weight = None
    if plan.with_entropy:  # d entropy / dz = -p (z - E_p[z]) = -p (log p + entropy)
        entropy_weight = g_entropy[..., None]

    def body(carry, j):
        d_hidden, d_kernel = carry
        w_chunk = jax.lax.dynamic_slice_in_dim(w, j * vc, vc, axis=vocab_dim)
        z, slope = _logits(plan, hidden, w_chunk)
        log_p = z - lse
        weight = g if entropy_weight is None else g + entropy_weight * (log_p + entropy[..., None])
        hit = jax.lax.dynamic_slice_in_dim(ids, j * vc, vc) == targets[..., None]
        d_z = jnp.where(hit, g, 0.0) - jnp.exp(log_p) * weight
        if slope is not None:
            d_z = d_z * slope
        if plan.temperature != 1.0:
            d_z = d_z / plan.temperature
        d_z = d_z.astype(w.dtype)
        d_hidden = d_hidden + jnp.einsum(h_spec, d_z, w_chunk, preferred_element_type=acc)
        d_chunk = _reduce_kernel_grad(plan, jnp.einsum(w_spec, hidden, d_z, preferred_element_type=acc), embed_dim)
        d_kernel = jax.lax.dynamic_update_slice_in_dim(d_kernel, d_chunk.astype(kernel.dtype), j * vc, vocab_dim)
        return (d_hidden, d_kernel), None

    init = (jnp.zeros(hidden.shape, acc), jnp.zeros_like(kernel))
    (d_hidden, d_kernel), _ = jax.lax.scan(body, init, jnp.arange(local_vocab // vc))
    return _psum(plan, d_hidden).astype(hidden.dtype), d_kernel


def _reduce_kernel_grad(plan: _Plan, d_w, embed_dim: int):
    """Sum the kernel gradient over the devices holding other rows; keep this device's embed shard."""
    if set(plan.embed_axes) <= set(plan.batch_axes):
        if plan.embed_axes:  # reduce-scatter: never a replicated float32 gradient of the table
            d_w = jax.lax.psum_scatter(d_w, plan.embed_axes, scatter_dimension=embed_dim, tiled=True)
        rest = tuple(a for a in plan.batch_axes if a not in plan.embed_axes)
        return jax.lax.psum(d_w, rest) if rest else d_w
    d_w = jax.lax.psum(d_w, plan.batch_axes) if plan.batch_axes else d_w
    size = d_w.shape[embed_dim] // plan.embed_shards
    return jax.lax.dynamic_slice_in_dim(d_w, jax.lax.axis_index(plan.embed_axes) * size, size, axis=embed_dim)


_fused.defvjp(_fused_fwd, _fused_bwd)
