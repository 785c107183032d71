"""One decoder-only transformer (Flax NNX) for Llama 3, Qwen 2.5, Qwen 3 and Gemma 3.

Inputs are `tokens`, `positions` and `segment_ids`, all `[batch, length]` int32.
Segment id 0 marks padding; tokens attend only to earlier tokens of the same
segment, so several examples packed in one row never see each other.

Parameters carry logical axis names (metadata `logical_axes`), never mesh axes:
`posttrain_jax.sharding` maps them to the mesh from config rules. Kernels keep
heads as their own axis (`[embed, heads, head_dim]`) so that tensor parallelism
over heads is a rule, not a reshape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from posttrain_jax.models.attention import attention, attention_mask, traced_platform, xla_attention
from posttrain_jax.models.config import SLIDING, ModelConfig, RopeConfig
from posttrain_jax.models.embedding import embed_lookup
from posttrain_jax.models.lora import project
from posttrain_jax.models.stacking import layer_groups, stack_modules, unstack
from posttrain_jax.sharding import constrain


def _param(rngs: nnx.Rngs, shape, axes, dtype, init="normal") -> nnx.Param:
    if init == "normal":  # transformers' default initializer_range
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        value = jnp.ones(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies in float32, as transformers computes them."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.type == "default":
        return inv_freq
    if rope.type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported RoPE type {rope.type!r} (supported: default, linear, llama3)")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate `x` [batch, length, heads, head_dim] by `positions` [batch, length] (rotate-half layout)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class RMSNorm(nnx.Module):
    """RMSNorm in float32; Gemma's variant scales by (1 + w) with w initialised at 0."""

    def __init__(self, dim: int, config: ModelConfig, *, rngs: nnx.Rngs, axis_name: str = "norm"):
        self.eps = config.rms_norm_eps
        self.plus_one = config.norm_plus_one
        self.scale = _param(rngs, (dim,), (axis_name,), config.param_dtype, "zeros" if self.plus_one else "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        if self.plus_one:
            return (xf * (1.0 + scale)).astype(x.dtype)
        # Llama/Qwen cast back before the weight multiply, as transformers does.
        return scale.astype(x.dtype) * xf.astype(x.dtype)


def layer_slots(config: ModelConfig, max_len: int) -> list[int]:
    """Cache slots of each layer in a per-layer cache: a sliding layer keeps only its window (a ring
    buffer, Gemma 3's five of every six layers), a global layer all `max_len`."""
    return [min(config.sliding_window, max_len) if t == SLIDING else max_len for t in config.layer_types]


@struct.dataclass
class KVCache:
    """Preallocated keys/values of every layer plus the segment id of every slot.

    `end` is the number of slots written so far (shared by the batch: prompts are
    padded to one length, padding slots carry segment id 0 and are never attended).
    Layer i's keys are `keys[i]`, whatever the parameter layout (scanned or not), in one of
    two layouts: one stacked array (`per_layer=False`: what a scan over layers indexes with
    a traced layer) or a tuple of one array per layer (`per_layer=True`: what a decode loop
    with unrolled layers wants; each layer's update is then an in-place write of the new
    slots, where a stacked array costs a copy of the layer's cache out and back per step).
    Heads come before slots, the order the attention dots contract in, so a decode step
    reads each layer's cache in place instead of transposing all of it. In a per-layer cache a
    sliding-window layer keeps only `sliding_window` slots, as a ring (absolute slot s at
    s mod W, `layer_slots`): Gemma 3's cache shrinks to about its global layers' share.
    """

    keys: jax.Array | tuple[jax.Array, ...]  # [layers, batch, kv_heads, max_len, head_dim] or layers x [batch, ...]
    values: jax.Array | tuple[jax.Array, ...]
    segment_ids: jax.Array  # [batch, max_len]
    end: jax.Array  # int32 scalar

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=None, per_layer: bool = False) -> "KVCache":
        """Zeros; with `per_layer`, sliding-window layers get a ring of `sliding_window` slots
        (`layer_slots`), the others `max_len`."""
        dtype = dtype or config.dtype
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        if per_layer:
            shapes = [(batch, config.num_kv_heads, n, config.head_dim) for n in layer_slots(config, max_len)]
            keys = tuple(jnp.zeros(s, dtype) for s in shapes)
            values = tuple(jnp.zeros(s, dtype) for s in shapes)
        else:
            keys, values = jnp.zeros((config.num_layers, *shape), dtype), jnp.zeros((config.num_layers, *shape), dtype)
        return cls(keys=keys, values=values, segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   end=jnp.zeros((), jnp.int32))

    @property
    def per_layer(self) -> bool:
        return isinstance(self.keys, tuple)

    @property
    def dtype(self):
        return self.keys[0].dtype if self.per_layer else self.keys.dtype


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        c, pd = config, config.param_dtype
        self.config = c
        self.window = c.sliding_window if c.layer_types[layer] == SLIDING else None
        # Kept as the (hashable) config, not an array: frequencies are trace-time constants.
        self.rope = c.local_rope if (self.window is not None and c.local_rope is not None) else c.rope
        self.q = _param(rngs, (c.hidden_size, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), pd)
        self.k = _param(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), pd)
        self.v = _param(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), pd)
        self.o = _param(rngs, (c.num_heads, c.head_dim, c.hidden_size), ("heads", "head_dim", "embed"), pd)
        if c.qkv_bias:
            self.q_bias = _param(rngs, (c.num_heads, c.head_dim), ("heads", "head_dim"), pd, "zeros")
            self.k_bias = _param(rngs, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), pd, "zeros")
            self.v_bias = _param(rngs, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), pd, "zeros")
        if c.o_bias:
            self.o_bias = _param(rngs, (c.hidden_size,), ("embed",), pd, "zeros")
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c, rngs=rngs, axis_name="head_dim")
            self.k_norm = RMSNorm(c.head_dim, c, rngs=rngs, axis_name="head_dim")

    def _project(self, x, name):
        c = self.config
        y = project(self, name, x, "btd,dhk->bthk", c.dtype)
        if c.qkv_bias:
            y = y + getattr(self, name + "_bias")[...].astype(c.dtype)
        return y

    def __call__(self, x, positions, segment_ids, cache_kv=None, cache_segments=None, start=None):
        c = self.config
        q, k, v = (self._project(x, n) for n in ("q", "k", "v"))
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(self.rope, c.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        length = x.shape[1]
        # A whole row goes to the configured kernel (segment ids, no dense mask), and so does a
        # prefill that fills the whole cache (the sampler's prompt-sized cache: start is 0 and the
        # keys are this chunk's); a few queries against a longer cache keep the dense mask.
        whole_row = cache_kv is None or cache_kv[0].shape[2] == length
        if cache_kv is not None and cache_kv[0].shape[2] < cache_segments.shape[1]:
            return self._ring_step(q, k, v, segment_ids, cache_kv, cache_segments, start)
        if cache_kv is not None:  # write this chunk into the (heads-major) cache
            cache_kv = tuple(jax.lax.dynamic_update_slice(cached, new.astype(cached.dtype).transpose(0, 2, 1, 3),
                                                          (0, 0, start, 0)) for cached, new in zip(cache_kv, (k, v)))
        if whole_row:
            out = self._attend(q, k, v, segment_ids)
        else:  # attend over every slot of the cache
            q_slots = jnp.arange(length, dtype=jnp.int32) + start
            k_slots = jnp.arange(cache_kv[0].shape[2], dtype=jnp.int32)
            mask = attention_mask(q_slots, k_slots, segment_ids, cache_segments, self.window)
            out = self._attend(q, cache_kv[0].astype(c.dtype), cache_kv[1].astype(c.dtype), segment_ids, mask)
        out = project(self, "o", out, "bthk,hkd->btd", c.dtype)
        if c.o_bias:
            out = out + self.o_bias[...].astype(c.dtype)
        return out, cache_kv

    def _ring_step(self, q, k, v, segment_ids, cache_kv, cache_segments, start):
        """A sliding layer whose cache is a ring of W = window slots (`KVCache.init(per_layer=True)`):
        absolute slot s lives at s mod W. The chunk's queries attend over the ring as it was (slots
        start - W .. start - 1) plus the chunk itself (a chunk longer than W needs keys the write
        evicts), then the chunk's last min(T, W) slots are written."""
        c = self.config
        ring, length = cache_kv[0].shape[2], q.shape[1]
        ring_index = jnp.arange(ring, dtype=jnp.int32)
        # Absolute slot held by ring index j: the last s < start with s = j (mod W); < 0 means never written.
        held = start - 1 - jnp.mod(start - 1 - ring_index, ring)
        held_segments = jnp.where(held >= 0, jnp.take(cache_segments, jnp.maximum(held, 0), axis=1), 0)
        q_slots = jnp.arange(length, dtype=jnp.int32) + start
        k_slots = jnp.concatenate([held, q_slots])
        k_segments = jnp.concatenate([held_segments, segment_ids.astype(jnp.int32)], axis=1)
        mask = attention_mask(q_slots, k_slots, segment_ids, k_segments, self.window)
        keys, values = (jnp.concatenate([cached.astype(c.dtype), new.transpose(0, 2, 1, 3)], axis=2)
                        for cached, new in zip(cache_kv, (k, v)))
        out = self._attend(q, keys, values, segment_ids, mask)
        kept = min(length, ring)
        news = (new[:, length - kept:].astype(cached.dtype).transpose(0, 2, 1, 3) for cached, new in zip(cache_kv, (k, v)))
        if kept == 1:  # a decode step: one in-place slot write
            cache_kv = tuple(jax.lax.dynamic_update_slice(cached, new, (0, 0, jnp.mod(start, ring), 0))
                             for cached, new in zip(cache_kv, news))
        else:
            slots = jnp.mod(q_slots[length - kept:], ring)
            cache_kv = tuple(cached.at[:, :, slots].set(new) for cached, new in zip(cache_kv, news))
        out = project(self, "o", out, "bthk,hkd->btd", c.dtype)
        if c.o_bias:
            out = out + self.o_bias[...].astype(c.dtype)
        return out, cache_kv

    def _attend(self, q, k, v, segment_ids, mask=None):
        """Grouped-query attention (posttrain_jax.models.attention); softmax in float32."""
        c = self.config
        scale = (c.query_pre_attn_scalar if c.query_pre_attn_scalar is not None else c.head_dim) ** -0.5
        if mask is not None:  # k, v: a heads-major cache
            return xla_attention(q, k, v, mask, scale=scale, softcap=c.attn_logit_softcap, heads_major=True)
        return attention(q, k, v, segment_ids, implementation=c.attention, scale=scale,
                         softcap=c.attn_logit_softcap, window=self.window, block=c.attention_block)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c, pd = config, config.param_dtype
        self.config = c
        self.gate = _param(rngs, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), pd)
        self.up = _param(rngs, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), pd)
        self.down = _param(rngs, (c.intermediate_size, c.hidden_size), ("mlp", "embed"), pd)
        if c.mlp_bias:
            self.gate_bias = _param(rngs, (c.intermediate_size,), ("mlp",), pd, "zeros")
            self.up_bias = _param(rngs, (c.intermediate_size,), ("mlp",), pd, "zeros")
            self.down_bias = _param(rngs, (c.hidden_size,), ("embed",), pd, "zeros")

    def __call__(self, x):
        c = self.config
        gate, up = project(self, "gate", x, "btd,dm->btm", c.dtype), project(self, "up", x, "btd,dm->btm", c.dtype)
        if c.mlp_bias:
            gate, up = gate + self.gate_bias[...].astype(c.dtype), up + self.up_bias[...].astype(c.dtype)
        act = jax.nn.silu(gate) if c.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        hidden = constrain(act * up, ("batch", "length", "mlp"))
        out = project(self, "down", hidden, "btm,md->btd", c.dtype)
        return out + self.down_bias[...].astype(c.dtype) if c.mlp_bias else out


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.sandwich = config.sandwich_norm
        self.attn_norm = RMSNorm(config.hidden_size, config, rngs=rngs)
        self.attn = Attention(config, layer, rngs=rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)
        if self.sandwich:
            self.post_attn_norm = RMSNorm(config.hidden_size, config, rngs=rngs)
            self.post_mlp_norm = RMSNorm(config.hidden_size, config, rngs=rngs)

    def __call__(self, x, positions, segment_ids, cache_kv=None, cache_segments=None, start=None):
        y, cache_kv = self.attn(self.attn_norm(x), positions, segment_ids, cache_kv, cache_segments, start)
        x = x + (self.post_attn_norm(y) if self.sandwich else y)
        y = self.mlp(self.mlp_norm(x))
        x = x + (self.post_mlp_norm(y) if self.sandwich else y)
        return constrain(x, ("batch", "length", "act_embed")), cache_kv


def remat_policy(name: str):
    """The `jax.checkpoint` policy of a `ModelConfig.remat` name (see `config.REMAT_POLICIES`)."""
    policies = jax.checkpoint_policies
    if name == "full":
        return policies.nothing_saveable
    if name == "dots":
        return policies.checkpoint_dots
    if name == "dots_no_batch":
        return policies.dots_with_no_batch_dims_saveable
    if name == "offload":
        return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"remat {name!r} has no checkpoint policy (one of full, dots, dots_no_batch, offload)")


def _layer_fn(graphdef: nnx.GraphDef, remat: str, in_scan: bool):
    """Pure (block state, x, ..., layer kv) -> (x, layer kv) for one block, rematerialised per `remat`."""

    def run(state, x, positions, segment_ids, kv, cache_segments, start):
        return nnx.merge(graphdef, state)(x, positions, segment_ids, kv, cache_segments, start)

    if remat == "none":
        return run
    # Inside a scan the loop already keeps XLA from merging forward and recomputed ops.
    return jax.checkpoint(run, policy=remat_policy(remat), prevent_cse=not in_scan)


def _unroll(config: ModelConfig) -> bool:
    """Whether a full-row forward runs stacked layers one by one (`ModelConfig.layer_loop`)."""
    if config.layer_loop == "auto":
        # Unrolled on CPU (an AOT compile for TPU on a CPU host says tpu: scan), unless layers are
        # rematerialised: XLA:CPU's scheduler hoists every unrolled layer's recomputation into the
        # forward pass (no optimization_barrier survives to its scheduler), so remat saves nothing
        # there (Gemma 3 270M at 8 x 512: 10.4 GiB of temporaries with remat=full vs 10.7 with
        # none); the scan's loop runs each recomputation when the backward pass reaches it (4.5 GiB).
        return traced_platform() == "cpu" and config.remat == "none"
    return config.layer_loop == "unrolled"


def _layer_kv(cache_kv, layer):
    """Layer `layer`'s (keys, values) of the cache: an element of a per-layer tuple (`layer` a
    Python int) or a slice of the stacked arrays (`layer` may be traced)."""
    if cache_kv is None:
        return None
    if isinstance(cache_kv[0], tuple):
        return tuple(c[layer] for c in cache_kv)
    return tuple(jax.lax.dynamic_index_in_dim(c, layer, keepdims=False) for c in cache_kv)


def _put_layer_kv(cache_kv, layer_kv, layer):
    if cache_kv is None:
        return None
    if isinstance(cache_kv[0], tuple):
        return tuple(c[:layer] + (u,) + c[layer + 1:] for c, u in zip(cache_kv, layer_kv))
    return tuple(jax.lax.dynamic_update_index_in_dim(c, u, layer, 0) for c, u in zip(cache_kv, layer_kv))


class Decoder(nnx.Module):
    """The whole model: embeddings, blocks, final norm and an LM or scalar head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c, pd = config, config.param_dtype
        self.config = c
        self.embed = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), pd)
        # Created in layer order whatever the layout, so one seed gives the same weights scanned or not.
        blocks = [Block(c, i, rngs=rngs) for i in range(c.num_layers)]
        if c.scan_layers:  # layout: see models/stacking.py
            period, groups = layer_groups(c)
            # No full group (e.g. num_layers=0 for a head-only AOT plan): nothing to scan, all in the tail.
            self.layers = nnx.List([stack_modules(blocks[j:period * groups:period]) for j in range(period)]
                                   if groups else [])
            self.tail = nnx.List(blocks[period * groups:])
        else:
            self.blocks = nnx.List(blocks)
        self.final_norm = RMSNorm(c.hidden_size, c, rngs=rngs)
        if c.head == "scalar":
            self.score = _param(rngs, (c.hidden_size, 1), ("embed", None), pd)
        elif not c.tie_embeddings:
            self.lm_head = _param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), pd)

    def hidden_states(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None, layers=None):
        """Final-norm hidden states [batch, length, hidden] and the updated cache.

        layers: None, or `unrolled_layers()` (made once, outside a decode loop) to run the blocks
        one by one in Python, e.g. with a per-layer cache.
        """
        c = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens, dtype=jnp.int32)
        x = embed_lookup(self.embed[...], tokens, c.dtype)  # table and gradient stay sharded
        if c.embed_scale:  # Gemma rounds sqrt(hidden) to the compute dtype first
            x = x * jnp.asarray(c.hidden_size**0.5, c.dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        start = cache_segments = None
        if cache is not None:
            start = cache.end
            cache_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                          (0, start))
        kv = None if cache is None else (cache.keys, cache.values)
        x, kv = self._run_layers(x, positions, segment_ids, kv, cache_segments, start, layers)
        if cache is not None:
            cache = KVCache(kv[0], kv[1], cache_segments, cache.end + tokens.shape[1])
        return self.final_norm(x), cache

    def unrolled_layers(self) -> list[tuple[nnx.GraphDef, nnx.State]]:
        """(graphdef, state) of every block in layer order, for `hidden_states(..., layers=)`.

        With scanned layers the states are slices of the stacks. XLA:CPU materialises any slice
        of a stacked weight (static or dynamic) as a copy before its dot, so a decode loop that
        slices inside its body copies every layer weight once per step: make these once, before
        the loop (one copy of the layer weights per call, held while the loop runs). A train
        step on CPU (`ModelConfig.layer_loop`) runs its layers from these slices too.
        """
        if not self.config.scan_layers:
            return [nnx.split(block) for block in self.blocks]
        period, groups = layer_groups(self.config)
        per_stack = []  # per_stack[j] = (graphdef, [state of layer g * period + j for each group g])
        for stack in self.layers:
            graphdef, state = nnx.split(stack)
            leaves, treedef = jax.tree.flatten(state)
            slices = [unstack(leaf) for leaf in leaves]  # one gradient write per stack, not one per layer
            per_stack.append((graphdef, [jax.tree.unflatten(treedef, [s[g] for s in slices]) for g in range(groups)]))
        layers = [(per_stack[j][0], per_stack[j][1][g]) for g in range(groups) for j in range(period)]
        return layers + [nnx.split(block) for block in self.tail]

    def _run_layers(self, x, positions, segment_ids, cache_kv, cache_segments, start, layers=None):
        """All blocks over x [batch, length, hidden]; cache_kv is None or the (keys, values) of a KVCache."""
        c = self.config
        remat = c.remat if cache_kv is None else "none"  # a cache means inference: nothing to save
        args = (positions, segment_ids)
        per_layer_cache = cache_kv is not None and isinstance(cache_kv[0], tuple)
        # A per-layer cache needs static indices; a full-row forward follows `layer_loop`.
        if layers is None and (not c.scan_layers or per_layer_cache or (cache_kv is None and _unroll(c))):
            layers = self.unrolled_layers()
        if layers is not None:
            for i, (graphdef, state) in enumerate(layers):
                x, kv = _layer_fn(graphdef, remat, False)(state, x, *args, _layer_kv(cache_kv, i),
                                                          cache_segments, start)
                cache_kv = _put_layer_kv(cache_kv, kv, i)
            return x, cache_kv
        period, groups = layer_groups(c)
        if not groups:
            graphdefs, states = (), ()
        else:
            graphdefs, states = zip(*(nnx.split(stack) for stack in self.layers))
        layer_fns = [_layer_fn(graphdef, remat, True) for graphdef in graphdefs]

        def group(carry, group_states):
            x, cache_kv, first = carry
            for j, (fn, state) in enumerate(zip(layer_fns, group_states)):
                x, kv = fn(state, x, *args, _layer_kv(cache_kv, first + j), cache_segments, start)
                cache_kv = _put_layer_kv(cache_kv, kv, first + j)
            return (x, cache_kv, first + period), None

        if groups:
            (x, cache_kv, _), _ = jax.lax.scan(group, (x, cache_kv, jnp.zeros((), jnp.int32)), states)
        for k, block in enumerate(self.tail):
            graphdef, state = nnx.split(block)
            layer = period * groups + k
            x, kv = _layer_fn(graphdef, remat, False)(state, x, *args, _layer_kv(cache_kv, layer),
                                                      cache_segments, start)
            cache_kv = _put_layer_kv(cache_kv, kv, layer)
        return x, cache_kv

    def head_kernel(self) -> tuple[jax.Array, bool]:
        """(LM head kernel in the compute dtype, True if it is the tied [vocab, hidden] embedding
        rather than an untied [hidden, vocab] kernel), for `losses.logprobs.lm_head_logprobs`."""
        c = self.config
        if c.tie_embeddings:
            return self.embed[...].astype(c.dtype), True
        return self.lm_head[...].astype(c.dtype), False

    def head(self, hidden: jax.Array) -> jax.Array:
        """LM logits [batch, length, vocab] (or scalars [batch, length] for a scalar head)."""
        c = self.config
        if c.head == "scalar":
            return (hidden @ self.score[...].astype(c.dtype))[..., 0]
        kernel = self.embed[...].T if c.tie_embeddings else self.lm_head[...]
        logits = hidden @ kernel.astype(c.dtype)
        if c.final_logit_softcap is not None:
            logits = jnp.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(self, tokens, positions=None, segment_ids=None):
        """Logits for a full (padded or packed) batch: no cache."""
        return self.head(self.hidden_states(tokens, positions, segment_ids)[0])

    def decode(self, tokens, positions, segment_ids, cache: KVCache, layers=None):
        """Logits for `tokens` written after the cache's `end`; returns (logits, new cache).
        layers: as in `hidden_states`."""
        hidden, cache = self.hidden_states(tokens, positions, segment_ids, cache, layers)
        return self.head(hidden), cache
