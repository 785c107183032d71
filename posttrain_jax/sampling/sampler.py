"""Generation as one compiled program: prefill, then a `lax.while_loop` decode.

`generate(params, cache, prompt_tokens, prompt_mask, rng)` is jitted once per
shape bucket (rows, prompt length, max new tokens). Parameters are an argument
(so the GRPO trainer samples from the params it is training, with no copy and
no recompilation), and the preallocated KV cache is donated and handed back, so
repeated calls decode in the same buffers.

Prompts may be left- or right-padded (any mask): inside the program each row is
moved to the right edge, so every row's last prompt token sits in the same
slot and one shared cache cursor serves the batch; padding slots carry segment
id 0 and are never attended to. Positions count real tokens only, so a row's
outputs do not depend on how much padding it got. Each prompt is prefilled
once and its cache rows copied to its `num_samples` samples.

The decode loop runs the layers one of two ways (`Sampler(decode_layers=...)`): `scan`, a
`lax.scan` over the stacked layers with a stacked cache (compile time independent of depth), or
`unrolled`, one block after another on per-layer weight slices made once before the loop and a
per-layer cache (XLA:CPU copies any slice of a stacked array before a dot, so on CPU a scanned
decode step copies every layer weight and every layer's cache; see benchmarks/README.md "Decode").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding

from posttrain_jax.models.transformer import KVCache, layer_slots
from posttrain_jax.sampling.strategies import SamplingParams, choose_tokens
from posttrain_jax.sharding import DEFAULT_RULES, Rules, constrain, logical_rules, logical_to_spec, normalize_rules

log = logging.getLogger(__name__)
_KV_AXES = ("layers", "batch", "kv_heads", "cache_length", "head_dim")
_LAYER_KV_AXES = _KV_AXES[1:]
DECODE_LAYERS = ("auto", "scan", "unrolled")
_SLOT_AXES = ("batch", "cache_length")


@struct.dataclass
class SampleOutput:
    """Completions of a batch; rows of one prompt are contiguous (prompt i -> rows i*n .. i*n+n-1).

    tokens [rows, max_new_tokens] int32: generated ids, the stop token included, then pad.
    logprobs [rows, max_new_tokens] float32: log p of each generated token (0 after the end).
    lengths [rows] int32: generated tokens per row (the stop token included).
    stopped [rows] bool: the row ended with a stop token (not by running out of tokens).
    """

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    stopped: jax.Array


def left_align(tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Move each row's real tokens (mask 1) to the right edge, keeping their order."""
    order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)  # padding first, then the prompt
    return jnp.take_along_axis(tokens, order, axis=1), jnp.take_along_axis(mask, order, axis=1)


def _constrain_cache(cache: KVCache) -> KVCache:
    def kv(x):
        if isinstance(x, tuple):
            return tuple(constrain(layer, _LAYER_KV_AXES) for layer in x)
        return constrain(x, _KV_AXES)
    return cache.replace(keys=kv(cache.keys), values=kv(cache.values),
                         segment_ids=constrain(cache.segment_ids, _SLOT_AXES))


def make_generate(graphdef: nnx.GraphDef, params: SamplingParams):
    """The pure generate function for one model structure and one SamplingParams (jit it).

    A per-layer cache (`KVCache.per_layer`) selects the unrolled decode loop, a stacked one the scan.
    """

    def generate(state, cache: KVCache, prompt_tokens, prompt_mask, rng):
        model = nnx.merge(graphdef, state)
        n, max_new = params.num_samples, params.max_new_tokens
        tokens, mask = left_align(prompt_tokens.astype(jnp.int32), prompt_mask.astype(jnp.int32))
        prompt_lengths = mask.sum(axis=1)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        prompts, prompt_len = tokens.shape

        # Prefill each prompt once, into a prompt-sized cache, then copy it to its n rows.
        small = KVCache.init(model.config, prompts, prompt_len, dtype=cache.dtype)
        hidden, small = model.hidden_states(tokens, positions, mask, small)
        logits = model.head(hidden[:, -1:])  # only the last slot's logits are needed
        repeat = lambda x, axis=0: jnp.repeat(x, n, axis=axis)  # noqa: E731

        def write(big, part, batch_axis=0):
            if isinstance(big, tuple):  # per layer: layer i of the stacked prompt cache into big[i]
                return tuple(write_ring(layer, part[i]) for i, layer in enumerate(big))
            return jax.lax.dynamic_update_slice(big, repeat(part, batch_axis), (0,) * big.ndim)

        def write_ring(big, part):
            """A sliding layer's ring of W < prompt slots keeps the last W, slot s at s mod W."""
            ring, length = big.shape[2], part.shape[2]
            if ring >= length:
                return write(big, part)
            return jnp.roll(repeat(part[:, :, length - ring:]), (length - ring) % ring, axis=2).astype(big.dtype)

        # Unrolled decode: slice the stacked layer weights here, once, not in every step.
        layers = model.unrolled_layers() if cache.per_layer else None
        cache = _constrain_cache(KVCache(
            keys=write(cache.keys, small.keys, 1), values=write(cache.values, small.values, 1),
            segment_ids=write(jnp.zeros_like(cache.segment_ids), small.segment_ids),
            end=jnp.asarray(prompt_len, jnp.int32)))
        rows = prompts * n
        lengths0 = repeat(prompt_lengths)
        key0, rng = jax.random.split(rng)
        first, first_logp = choose_tokens(repeat(logits[:, -1]), key0, params)
        stop = jnp.asarray(params.stop_tokens or (-1,), jnp.int32)

        out_tokens = jnp.full((rows, max_new), params.pad_token, jnp.int32).at[:, 0].set(first)
        out_logps = jnp.zeros((rows, max_new), jnp.float32).at[:, 0].set(first_logp)
        done = jnp.isin(first, stop)
        carry = (jnp.asarray(1, jnp.int32), cache, out_tokens, out_logps, done, first, jnp.ones((rows,), jnp.int32))

        def cond(carry):
            step, *_, done, _, _ = carry
            return (step < max_new) & ~jnp.all(done)

        def body(carry):
            step, cache, out_tokens, out_logps, done, last, lengths = carry
            # The last sampled token enters the cache at position prompt_length + step - 1.
            pos = (lengths0 + step - 1)[:, None]
            logits, cache = model.decode(last[:, None], pos, jnp.ones((rows, 1), jnp.int32), cache, layers)
            token, logp = choose_tokens(logits[:, -1], jax.random.fold_in(rng, step), params)
            token = jnp.where(done, params.pad_token, token)
            logp = jnp.where(done, 0.0, logp)
            out_tokens = jax.lax.dynamic_update_slice(out_tokens, token[:, None], (0, step))
            out_logps = jax.lax.dynamic_update_slice(out_logps, logp[:, None], (0, step))
            lengths = lengths + (~done).astype(jnp.int32)
            done = done | jnp.isin(token, stop)
            return step + 1, _constrain_cache(cache), out_tokens, out_logps, done, token, lengths

        _, cache, out_tokens, out_logps, done, _, lengths = jax.lax.while_loop(cond, body, carry)
        stopped = jnp.isin(jnp.take_along_axis(out_tokens, (lengths - 1)[:, None], axis=1)[:, 0], stop)
        return SampleOutput(out_tokens, out_logps, lengths, stopped), cache

    return generate


def _bucket(length: int, minimum: int = 16) -> int:
    """Round a prompt length up to a power of two (>= minimum): few shapes, few compilations."""
    return max(minimum, 1 << math.ceil(math.log2(max(length, 1))))


class Sampler:
    """Host-side front end: pads a list of prompts to a shape bucket and runs the compiled program.

    One compilation per (rows, prompt bucket + max new tokens, SamplingParams); the KV cache of
    the last bucket is kept and donated back on the next call.

    decode_layers: how the decode loop runs the layers (module docstring): `scan`, `unrolled`, or
    `auto`: unrolled for unscanned models and on CPU (where it is ~1.5x faster per step), scan
    elsewhere (an unrolled loop holds a second copy of the layer weights while it runs and
    compiles in time proportional to depth).
    """

    def __init__(self, graphdef: nnx.GraphDef, config, *, mesh: jax.sharding.Mesh | None = None,
                 rules: Rules = DEFAULT_RULES, cache_dtype=None, max_prompt_length: int | None = None,
                 decode_layers: str = "auto"):
        if decode_layers not in DECODE_LAYERS:
            raise ValueError(f"decode_layers={decode_layers!r} is not one of {', '.join(DECODE_LAYERS)}")
        self.graphdef, self.config, self.mesh = graphdef, config, mesh
        if decode_layers == "auto":
            platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
            decode_layers = "unrolled" if (not config.scan_layers or platform == "cpu") else "scan"
        self.decode_layers = decode_layers
        self.rules = normalize_rules(rules)
        self.cache_dtype = cache_dtype or config.dtype
        self.max_prompt_length = max_prompt_length
        self._programs: dict[tuple, jax.stages.Wrapped] = {}
        self._cache: KVCache | None = None

    @property
    def data_shards(self) -> int:
        if self.mesh is None:
            return 1
        spec = logical_to_spec(("batch",), self.rules, self.mesh.axis_names)[0]
        axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
        return int(np.prod([self.mesh.shape[a] for a in axes]))

    def compilations(self) -> int:
        return sum(p._cache_size() for p in self._programs.values())

    def _program(self, params: SamplingParams, cache: KVCache):
        """The compiled program for these params; the cache comes back in the very shardings it went in
        (an equivalent but differently spelled sharding would make the next call recompile)."""
        key = (params, cache.segment_ids.shape)
        if key not in self._programs:
            out = None if self.mesh is None else (None, jax.tree.map(lambda x: x.sharding, cache))
            self._programs[key] = jax.jit(make_generate(self.graphdef, params), donate_argnums=1,
                                          out_shardings=out)
        return self._programs[key]

    def _sharding(self, names):
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, logical_to_spec(names, self.rules, self.mesh.axis_names))

    def _get_cache(self, rows: int, max_len: int) -> KVCache:
        cache = self._cache
        if cache is not None and cache.segment_ids.shape == (rows, max_len):
            self._cache = None  # donated: never touch it again
            return cache
        self._cache = None
        c = self.config
        shape = (c.num_layers, rows, c.num_kv_heads, max_len, c.head_dim)
        slots = self._sharding(_SLOT_AXES)

        def zeros(shape, dtype, sharding):
            # Committed like the cache the program hands back: an uncommitted first cache would make the
            # second call (with the returned, committed one) compile the program again.
            return jnp.zeros(shape, dtype, device=sharding if sharding is not None else jax.devices()[0])
        if self.decode_layers == "unrolled":  # sliding layers: a ring of their window (layer_slots)
            layer = self._sharding(_LAYER_KV_AXES)
            keys, values = (tuple(zeros((rows, c.num_kv_heads, slots_i, c.head_dim), self.cache_dtype, layer)
                                  for slots_i in layer_slots(c, max_len)) for _ in range(2))
        else:
            kv = self._sharding(_KV_AXES)
            keys, values = zeros(shape, self.cache_dtype, kv), zeros(shape, self.cache_dtype, kv)
        return KVCache(keys=keys, values=values,
                       segment_ids=zeros((rows, max_len), jnp.int32, slots),
                       end=zeros((), jnp.int32, self._sharding(())))

    def generate_padded(self, state, prompt_tokens: np.ndarray, prompt_mask: np.ndarray, params: SamplingParams,
                        rng: jax.Array) -> SampleOutput:
        """Run on already padded [prompts, length] arrays (shapes are the bucket). Returns global device arrays.

        On several processes each passes its own rows; the outputs are global arrays.
        """
        batch = self._sharding(("batch", None))
        if batch is not None:  # each process passes its own prompts (all of them on one host)
            prompt_tokens, prompt_mask = (jax.make_array_from_process_local_data(batch, np.asarray(x))
                                          for x in (prompt_tokens, prompt_mask))
        prompts, length = prompt_tokens.shape
        cache = self._get_cache(prompts * params.num_samples, length + params.max_new_tokens)
        program = self._program(params, cache)
        if self.mesh is not None:
            with jax.set_mesh(self.mesh), logical_rules(self.rules):
                out, self._cache = program(state, cache, prompt_tokens, prompt_mask, rng)
        else:
            out, self._cache = program(state, cache, prompt_tokens, prompt_mask, rng)
        return out

    def __call__(self, state, prompts: Sequence[Sequence[int]], params: SamplingParams, *, seed: int = 0,
                 rng: jax.Array | None = None, prompt_bucket: int | None = None) -> SampleOutput:
        """Sample completions for token-id prompts; returns numpy arrays for exactly these prompts."""
        if not prompts:
            raise ValueError("no prompts to sample from")
        longest = max(len(p) for p in prompts)
        for i, p in enumerate(prompts):
            if not len(p):
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if self.max_prompt_length is not None and longest > self.max_prompt_length:
            worst = max(range(len(prompts)), key=lambda i: len(prompts[i]))
            raise ValueError(f"prompt {worst} has {longest} tokens, more than max_prompt_length="
                             f"{self.max_prompt_length}; shorten it or raise the limit")
        width = prompt_bucket or _bucket(longest)
        if width < longest:
            raise ValueError(f"prompt_bucket {width} is shorter than the longest prompt ({longest} tokens)")
        shards = self.data_shards
        # Rows (prompts x samples) must split over the data-parallel shards; pad with one-token dummies.
        step = shards // math.gcd(shards, params.num_samples)
        padded = -(-len(prompts) // step) * step
        tokens = np.full((padded, width), params.pad_token, np.int32)
        mask = np.zeros((padded, width), np.int32)
        for i in range(padded):
            p = prompts[i] if i < len(prompts) else prompts[0][:1]
            tokens[i, width - len(p):], mask[i, width - len(p):] = p, 1
        rng = rng if rng is not None else jax.random.key(seed)
        out = self.generate_padded(state, tokens, mask, params, rng)
        keep = len(prompts) * params.num_samples
        return jax.tree.map(lambda x: np.asarray(x)[:keep], out)
