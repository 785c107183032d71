"""How the fused LM-head losses cut their work: the plan, the mesh layout and the per-chunk pieces.

Shared by `logprobs` (the recomputing fused log-probs every objective uses) and
`logprob_sum` (SFT's one-pass variant). A `Plan` is static (hashable): the
kernel's orientation, softcap and temperature, the sequence chunk and the
vocabulary chunk, and, under a mesh with logical rules, which mesh axes split
the rows (`data`, `fsdp`), the vocabulary (`tensor`) and the kernel's hidden
dimension (`fsdp`). Everything else here runs per device inside `shard_map`.

Chunk sizes. A chunk of logits holds at most `DEFAULT_CHUNK_ELEMENTS` float32
elements per device (or rows x `chunk_size` x local vocabulary when the caller
sets a sequence chunk). Where the kernel is whole on each device the forward
pass cuts the sequence (`chunk` positions, all of the vocabulary); the backward
pass, and the forward pass where the kernel's hidden dimension is sharded
(FSDP), cut the vocabulary (`vocab_chunk` entries, all rows and positions), so
that each step needs only one vocabulary slice of the kernel (`kernel_slice`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from posttrain_jax.sharding import active_rules, logical_to_spec

# Logits elements per device in one chunk (128 MiB in float32). Big enough that each chunk's matmul
# runs at full speed on CPU and TPU (>= 128 rows x the vocabulary, or all rows x >= 8k entries at
# 16k rows), small enough that a 128k-262k vocabulary costs well under 1 GiB of temporaries.
DEFAULT_CHUNK_ELEMENTS = 2**25


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of one fused call (hashable: a custom_vjp non-diff argument)."""

    vocab_major: bool  # kernel is [vocab, hidden] (tied embedding) rather than [hidden, vocab]
    softcap: float | None
    temperature: float
    chunk: int  # sequence positions per forward chunk (the whole length on the vocabulary-chunked path)
    vocab_chunk: int  # vocabulary entries (per device) per backward chunk, and per forward chunk under FSDP
    with_entropy: bool
    with_max: bool
    pad: int = 0  # positions appended to make whole chunks (dropped from the results)
    batch_axes: tuple[str, ...] = ()  # mesh axes splitting rows (inside shard_map)
    vocab_axes: tuple[str, ...] = ()  # mesh axes splitting the vocabulary
    embed_axes: tuple[str, ...] = ()  # mesh axes splitting the kernel's hidden dimension
    embed_shards: int = 1
    mesh: object = None  # the (abstract) mesh for shard_map; None: plain arrays on one device or GSPMD

    @property
    def vocab_forward(self) -> bool:
        """Whether the forward pass loops over vocabulary slices (the kernel's hidden dim is sharded)."""
        return self.embed_shards > 1


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


def plan_and_pad(hidden, kernel, targets, *, vocab_major: bool, softcap, temperature, chunk_size,
                 with_entropy: bool = False, with_max: bool = False, min_chunk_tokens: int = 1):
    """Check the shapes, pick the chunks and the mesh layout; pad hidden / targets to whole chunks.

    An automatic sequence chunk is doubled until it holds `min_chunk_tokens` (rows x positions per
    device). Where the kernel's hidden dimension is sharded the forward pass loops over the vocabulary:
    no padding, and an explicit `chunk_size` sets the vocabulary chunk to the same number of logits
    (rows x chunk_size x local vocabulary = rows x length x vocab_chunk). Raises ValueError on shapes
    that do not match.
    """
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
    rows, vocab, embed_shards = hidden.shape[0], kernel.shape[vocab_dim], 1
    if axes is not None:
        mesh, batch_axes, vocab_axes, embed_axes = axes
        rows //= _size(mesh, batch_axes)
        vocab //= _size(mesh, vocab_axes)
        embed_shards = _size(mesh, embed_axes)
    length = hidden.shape[1]
    if embed_shards > 1:  # vocabulary-chunked forward: all positions at once
        chunk = length
        # An explicit chunk_size can shrink the slice below the default budget, never grow it past the
        # budget the backward pass always used (a config sized for sequence chunks keeps its memory).
        limit = DEFAULT_CHUNK_ELEMENTS // (rows * length)
        if chunk_size:
            limit = min(limit, chunk_size * vocab // length)
    else:
        chunk = min(chunk_size, length) if chunk_size else default_chunk_size(rows, length, vocab)
        while not chunk_size and chunk < length and rows * chunk < min_chunk_tokens:
            chunk *= 2
    padded = -(-length // chunk) * chunk  # a whole number of chunks; padded positions are dropped by the caller
    if embed_shards == 1:  # (the recomputing backward's vocabulary chunk, as it always was)
        limit = DEFAULT_CHUNK_ELEMENTS // (rows * padded)
    vocab_chunk = vocab_slice(vocab, max(1, limit))
    plan = Plan(vocab_major, None if softcap is None else float(softcap), float(temperature), chunk,
                vocab_chunk, with_entropy, with_max, pad=padded - length)
    if axes is not None:
        plan = dataclasses.replace(plan, batch_axes=batch_axes, vocab_axes=vocab_axes, embed_axes=embed_axes,
                                   embed_shards=embed_shards, mesh=mesh)
    targets = targets.astype(jnp.int32)
    if padded != length:
        hidden = jnp.pad(hidden, ((0, 0), (0, padded - length), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, padded - length)))
    return plan, hidden, targets


def vocab_slice(n: int, limit: int) -> int:
    """Vocabulary entries per chunk: a divisor of `n` near `limit` (entries that fit the budget).

    The largest divisor <= limit, unless that collapses below limit / 4; then the smallest divisor
    >= limit if it is at most 2 x limit. Qwen's 151936 = 2^7 x 1187 under a limit of 1024 would
    otherwise get 128-entry slices: 1187 chunks, each its own kernel all-gather under FSDP.
    """
    limit = min(limit, n)
    divisors = {d for k in range(1, int(n**0.5) + 1) if n % k == 0 for d in (k, n // k)}
    below = max(d for d in divisors if d <= limit)
    if below * 4 < limit:
        above = min(d for d in divisors if d >= limit)
        if above <= 2 * limit:
            return above
    return below


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


def on_mesh(plan: Plan, fn, args: str, outs: str):
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


def kernel_slice(plan: Plan, kernel, start, size: int):
    """Local vocabulary entries [start, start + size) of the kernel with the whole hidden dimension.

    Sliced from this device's shard first, then all-gathered over the embed axes: a loop over all
    slices moves one kernel in total, and the gathered kernel never exists whole.
    """
    vocab_dim = 0 if plan.vocab_major else 1
    w = jax.lax.dynamic_slice_in_dim(kernel, start, size, axis=vocab_dim)
    if plan.embed_axes:
        w = jax.lax.all_gather(w, plan.embed_axes, axis=1 - vocab_dim, tiled=True)
    return w


def chunk_logits(plan: Plan, h, w):
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


def vocab_ids(plan: Plan, local_vocab: int):
    """Global ids of this device's vocabulary entries, int32 [local_vocab]."""
    offset = jax.lax.axis_index(plan.vocab_axes) * local_vocab if plan.vocab_axes else 0
    return jnp.arange(local_vocab, dtype=jnp.int32) + offset


def psum_vocab(plan: Plan, x):
    """Sum over the devices holding other parts of the vocabulary."""
    return jax.lax.psum(x, plan.vocab_axes) if plan.vocab_axes else x


def seq_chunk(x, i, chunk):
    """Positions [i * chunk, (i + 1) * chunk) of x [rows, length, ...]."""
    return jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)


def reduce_kernel_grad(plan: Plan, d_w, embed_dim: int):
    """Sum the kernel gradient over the devices holding other rows; keep this device's embed shard."""
    if set(plan.embed_axes) <= set(plan.batch_axes):
        if plan.embed_axes:  # reduce-scatter: never a replicated float32 gradient of the table
            d_w = jax.lax.psum_scatter(d_w, plan.embed_axes, scatter_dimension=embed_dim, tiled=True)
        rest = tuple(a for a in plan.batch_axes if a not in plan.embed_axes)
        return jax.lax.psum(d_w, rest) if rest else d_w
    d_w = jax.lax.psum(d_w, plan.batch_axes) if plan.batch_axes else d_w
    size = d_w.shape[embed_dim] // plan.embed_shards
    return jax.lax.dynamic_slice_in_dim(d_w, jax.lax.axis_index(plan.embed_axes) * size, size, axis=embed_dim)
