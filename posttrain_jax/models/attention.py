"""Attention kernels behind one call, chosen by `ModelConfig.attention`.

| name      | where                 | mask handled                                   | memory of scores      |
|-----------|-----------------------|------------------------------------------------|-----------------------|
| `xla`     | everywhere            | dense bool mask per causal query chunk          | ~(n+1)/2n of          |
|           |                       | (`dense_xla_attention`: the whole-square oracle)| [B, K, G, T, T] fp32  |
| `blocked` | everywhere            | causal, segments, window from slots/ids        | one [bq, bk] block    |
| `splash`  | TPU (Pallas)          | causal/local static mask + segment ids         | one block (on chip)   |
| `cudnn`   | NVIDIA GPU, bf16/fp16 | causal + left window in cuDNN; segments/padding | [B, 1, T, S] bias     |
|           |                       | as a boolean mask (cuDNN turns it into a bias)  | (always; not per head)|
| `auto`    | TPU: splash; GPU: cudnn when its constraints hold (16-bit dtype, no softcap, |
|           | head_dim <= 256, multiple of 8); otherwise blocked for T >= 2048 and xla     |
|           | below (short rows: XLA's fused einsums are fastest, the [T, T] scores small)  |

Every kernel computes, for query slot i and key slot j of the same row,
softmax_j(scale * q_i.k_j) over the keys with j <= i, segment_ids[j] == segment_ids[i]
!= 0 and (with a window W) i - j < W; Gemma's `attn_logit_softcap` caps the scaled
scores as tanh(s / c) * c before the mask (Gemma 2, transformers' eager attention).
Rows of padding queries (segment id 0) are unspecified: each kernel returns finite
values there and nothing downstream reads them.

Decoding and prefill against a KV cache (`posttrain_jax.sampling`) take few queries
against a cache of any fill level, so they keep the dense-mask `xla_attention`.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax.models.attention_blocked import blocked_attention
from posttrain_jax.sharding import active_rules, logical_to_spec

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "xla", "blocked", "splash", "cudnn")
# A finite mask value keeps fully masked rows (padding queries) free of NaNs.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# `auto` switches from the dense oracle to the blocked kernel at this many query slots.
BLOCKED_MIN_LENGTH = 2048
# `xla` cuts a row's queries into at most this many causal chunks of at least this many slots.
_MAX_QUERY_CHUNKS, _MIN_QUERY_CHUNK = 8, 128
_SPLASH_LANES = 128  # splash blocks are multiples of the TPU lane width


def attention_mask(q_slots, k_slots, q_segments, k_segments, window: int | None) -> jax.Array:
    """[batch, q_len, k_len] bool: causal, same segment, key not padding, inside the window.

    q_slots [q_len] / k_slots [k_len] int: slot of each query / key in its row (the cache
    index when decoding); q_segments [batch, q_len], k_segments [batch, k_len]: segment ids.
    """
    mask = (k_slots[None, None, :] <= q_slots[None, :, None])
    mask &= q_segments[:, :, None] == k_segments[:, None, :]
    mask &= (k_segments != 0)[:, None, :]
    if window is not None:
        mask &= (q_slots[:, None] - k_slots[None, :] < window)[None]
    return mask


def xla_attention(q, k, v, mask, *, scale: float, softcap: float | None = None,
                  heads_major: bool = False) -> jax.Array:
    """The oracle: grouped-query attention over a dense mask, scores and softmax in float32.

    q [batch, T, heads, head_dim], k/v [batch, S, kv_heads, head_dim] (heads_major: [batch,
    kv_heads, S, head_dim], the KV cache's layout), mask [batch, T, S] bool.
    Returns [batch, T, heads, head_dim] in v's dtype.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[1 if heads_major else 2]
    kv = "bksd" if heads_major else "bskd"
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum(f"btkgd,{kv}->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if heads_major:  # [b, k, (g t), s] x [b, k, s, d] is XLA:CPU's fast batched-matmul form; asking for
        # "btkgd" directly makes XLA compute the transposed product, which its CPU matmul library
        # does not take (a generic dot, ~10x slower at decode shapes)
        out = jnp.einsum("bkgts,bksd->bkgtd", probs, v).transpose(0, 3, 1, 2, 4)
    else:
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def causal_xla_attention(q, k, v, segment_ids, *, scale: float, softcap: float | None = None,
                         window: int | None = None) -> jax.Array:
    """`xla_attention` of a full row, its queries cut into chunks that read only the keys they can see.

    Query chunk [a, b) attends keys [max(0, a - window + 1), b): the causal (and window) mask
    zeroes the rest, so each query's softmax is the dense one, while the scores, softmax and
    their gradients shrink to (n + 1) / 2n of the square for n chunks (n = 4 at T = 512: the
    fwd + bwd of bench-small's attention 682 -> 365 ms per layer on 2 CPU cores). Padding
    queries (all keys masked, a uniform softmax in the oracle) average over fewer keys; nothing
    reads them. Shapes as in `attention`.
    """
    t = q.shape[1]
    chunks = min(_MAX_QUERY_CHUNKS, max(1, t // _MIN_QUERY_CHUNK))
    slots = jnp.arange(t, dtype=jnp.int32)
    bounds = [t * i // chunks for i in range(chunks + 1)]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        lo = 0 if window is None else max(0, a - window + 1)  # key a - W + 1 is the oldest any query sees
        mask = attention_mask(slots[a:b], slots[lo:b], segment_ids[:, a:b], segment_ids[:, lo:b], window)
        outs.append(xla_attention(q[:, a:b], k[:, lo:b], v[:, lo:b], mask, scale=scale, softcap=softcap))
    return jnp.concatenate(outs, axis=1).astype(q.dtype)


def dense_xla_attention(q, k, v, segment_ids, *, scale: float, softcap: float | None = None,
                        window: int | None = None) -> jax.Array:
    """The oracle: `xla_attention` of every query against every key over the whole [T, T] mask.

    Shapes as in `attention`; what `causal_xla_attention` and every other kernel are tested against.
    """
    slots = jnp.arange(q.shape[1], dtype=jnp.int32)
    mask = attention_mask(slots, slots, segment_ids, segment_ids, window)
    return xla_attention(q, k, v, mask, scale=scale, softcap=softcap).astype(q.dtype)


def traced_platform() -> str:
    """The platform of the mesh being traced for (an AOT TPU topology on a CPU host says tpu)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh.abstract_device.platform
    return jax.default_backend()


def cudnn_supported(q, *, softcap: float | None) -> str | None:
    """None when cuDNN flash attention takes these inputs, else the reason it does not."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bfloat16 or float16, got {q.dtype} (set model.dtype=bfloat16)"
    if softcap is not None:
        return "cuDNN flash attention has no logit soft-cap (attn_logit_softcap)"
    head_dim = q.shape[-1]
    if head_dim > 256 or head_dim % 8:
        return f"cuDNN flash attention needs head_dim <= 256 and a multiple of 8, got {head_dim}"
    return None


def resolve_implementation(name: str, q, *, softcap: float | None, platform: str | None = None) -> str:
    """The kernel `name` stands for on `platform` (default: the traced mesh's, else JAX's backend)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if name != "auto":
        return name
    platform = platform or traced_platform()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda") and cudnn_supported(q, softcap=softcap) is None:
        return "cudnn"
    return "blocked" if q.shape[1] >= BLOCKED_MIN_LENGTH else "xla"


def attention(q, k, v, segment_ids, *, implementation: str = "auto", scale: float,
              softcap: float | None = None, window: int | None = None, block: int = 512) -> jax.Array:
    """Causal self-attention of a full (padded or packed) row with the chosen kernel.

    q [batch, T, heads, head_dim]; k, v [batch, T, kv_heads, head_dim] (GQA: query head h reads
    kv head h // (heads // kv_heads)); segment_ids [batch, T] int, 0 = padding. scale multiplies
    q.k (Gemma: query_pre_attn_scalar ** -0.5, else head_dim ** -0.5); softcap caps scaled
    scores; window W: keys with query slot - key slot < W only. block: query/key block length
    of the blocked and splash kernels. Returns [batch, T, heads, head_dim] in q's dtype.
    Raises ValueError for an unknown implementation or one that cannot take these inputs.
    """
    name = resolve_implementation(implementation, q, softcap=softcap)
    if name == "xla":
        return causal_xla_attention(q, k, v, segment_ids, scale=scale, softcap=softcap, window=window)
    if name == "blocked":
        return blocked_attention(q, k, v, segment_ids, scale=scale, softcap=softcap, window=window, block=block)
    if name == "cudnn":
        reason = cudnn_supported(q, softcap=softcap)
        if reason is not None:
            raise ValueError(f"model.attention='cudnn': {reason}; use model.attention=auto, blocked or xla")
        return _sharded(functools.partial(cudnn_attention, scale=scale, window=window), q, k, v, segment_ids)
    return _sharded(functools.partial(splash_attention, scale=scale, softcap=softcap, window=window,
                                      block=block), q, k, v, segment_ids)


def cudnn_attention(q, k, v, segment_ids, *, scale: float, window: int | None = None,
                    implementation: str = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` with cuDNN: causal and the left window run mask-free in
    cuDNN; segment ids (packing) and padding go in as a [batch, 1, T, T] boolean mask, which
    cuDNN applies as an additive bias. Whether a batch is packed is data, unknown at trace time,
    so the mask is always built: memory O(B T^2) once per layer call (not per head, no float32
    scores). Its packed-segment layout (q/kv offsets) is not exposed by `jax.nn`.
    `implementation="xla"` runs the same argument mapping on any backend (tests on CPU).
    """
    same_segment = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids != 0)[:, None, :]
    # Padding queries (segment 0) see no key: give them themselves so no row is empty (cuDNN
    # does not define an all-masked row); their outputs are never read.
    slots = jnp.arange(q.shape[1], dtype=jnp.int32)
    same_segment |= ((segment_ids == 0)[:, :, None] & (slots[:, None] == slots[None, :])[None])
    # local_window_size=(W - 1, 0): key j visible iff i - j <= W - 1, i.e. i - j < W.
    local = None if window is None else (int(window) - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, mask=same_segment[:, None], scale=scale, is_causal=True,
                                        local_window_size=local, implementation=implementation)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, length: int, window: int | None, softcap: float | None, block: int,
                   interpret: bool):
    """A splash kernel for one row: static causal (or causal local) mask over `heads` heads."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    if window is None:
        mask = splash.CausalMask((length, length))
    else:  # LocalMask keeps q - left <= k <= q + right: left = W - 1, right = 0 is causal and i - j < W
        mask = splash.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                              block_kv_dq=block)
    # The block tables are built from numpy at trace time: make them concrete constants so the
    # cached kernel never holds a tracer of the jit that first built it.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                      q_seq_shards=1, attn_logits_soft_cap=softcap, mask_value=MASK_VALUE,
                                      interpret=interpret)


def splash_attention(q, k, v, segment_ids, *, scale: float, softcap: float | None = None,
                     window: int | None = None, block: int = 512, interpret: bool | None = None) -> jax.Array:
    """Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`).

    Shapes as `attention`. The causal / causal-local mask is static (blocks outside it are
    skipped); packing and padding go in as segment ids. T is padded to a multiple of 128
    (padding is segment 0, after every real key, so causality hides it). q is scaled before
    the kernel (splash has no scale argument), so the soft-cap applies to scale * q.k as in
    the oracle. interpret: run the Pallas kernel in interpret mode (default: off TPU only).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    if interpret is None:
        interpret = traced_platform() != "tpu"
        if interpret:
            _warn_once("model.attention='splash' off TPU runs the Pallas kernel in interpret mode: correct but "
                       "very slow (meant for tests); use model.attention=auto, blocked or xla here")
    batch, length, heads, dim = q.shape
    padded = -(-length // _SPLASH_LANES) * _SPLASH_LANES
    block = next(b for b in (max(_SPLASH_LANES, block // _SPLASH_LANES * _SPLASH_LANES), 512, 256, 128)
                 if b <= padded and padded % b == 0)
    segment_ids = segment_ids.astype(jnp.int32)
    if padded != length:
        pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        segment_ids = jnp.pad(segment_ids, [(0, 0), (0, padded - length)])
    kernel = _splash_kernel(heads, padded, None if window is None else int(window),
                            None if softcap is None else float(softcap), block, bool(interpret))
    q = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # [batch, heads, T, dim]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)  # vmapped over rows with q, k, v
    out = jax.vmap(kernel)(q, k, v, ids)
    return out.transpose(0, 2, 1, 3)[:, :length].astype(q.dtype)


def _sharded(kernel, q, k, v, segment_ids):
    """Run a kernel GSPMD cannot partition (a Pallas or cuDNN custom call) under `shard_map`:
    rows split like the batch, heads like the heads (when kv heads split too), length whole."""
    rules = active_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return kernel(q, k, v, segment_ids)
    names = mesh.axis_names
    batch_spec = logical_to_spec(("batch",), rules, names)[0]
    head_spec = logical_to_spec(("batch", "heads"), rules, names)[1]
    head_parts = _axes_size(mesh, head_spec)
    if q.shape[2] % head_parts or k.shape[2] % head_parts:
        head_spec = None  # e.g. one kv head over tensor=2: keep heads whole in the kernel
    if q.shape[0] % _axes_size(mesh, batch_spec):
        batch_spec = None
    qkv = jax.sharding.PartitionSpec(batch_spec, None, head_spec, None)
    ids = jax.sharding.PartitionSpec(batch_spec, None)
    return jax.shard_map(kernel, in_specs=(qkv, qkv, qkv, ids), out_specs=qkv, check_vma=False)(
        q, k, v, segment_ids)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


def _axes_size(mesh, entry) -> int:
    if entry is None:
        return 1
    entries = (entry,) if isinstance(entry, str) else entry
    return int(np.prod([mesh.shape[a] for a in entries]))
