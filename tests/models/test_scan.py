"""Scanned layers against the unrolled oracle, the KV cache, and remat policies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain_jax.mesh import make_mesh
from posttrain_jax.models import KVCache, create_model, preset
from posttrain_jax.models.transformer import layer_slots
from posttrain_jax.models.config import _GEMMA3_LAYERS, FULL, REMAT_POLICIES, SLIDING, ModelConfig
from posttrain_jax.models.stacking import layer_groups, layer_period, scanned_location, unstacked_sources
from posttrain_jax.sharding import DEFAULT_RULES

# A periodic Gemma 3 stack in few layers: period 2, two scanned groups, one unrolled tail layer.
GEMMA5 = dict(num_layers=5, layer_types=(SLIDING, FULL) * 2 + (SLIDING,))
CASES = {"llama": ("tiny-llama", dict(num_layers=4, layer_types=())),
         "qwen2": ("tiny-qwen2", dict(num_layers=3, layer_types=())),
         "qwen3": ("tiny-qwen3", dict(num_layers=3, layer_types=())), "gemma3": ("tiny-gemma3", GEMMA5)}


def _pair(name, layer_loop="scan", **overrides):
    preset_name, kw = CASES[name]
    config = preset(preset_name, **{**kw, **overrides})
    return (create_model(config.replace(scan_layers=True, layer_loop=layer_loop), seed=3),
            create_model(config.replace(scan_layers=False), seed=3))


def _batch(config, rows=2, length=12):
    tokens = jax.random.randint(jax.random.key(1), (rows, length), 0, config.vocab_size)
    segments = jnp.asarray([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])  # packed row, padded row
    positions = jnp.asarray([list(range(5)) + list(range(7)), list(range(9)) + [0] * 3])
    return tokens, positions, segments


def _loss(params, graphdef, tokens, positions, segments):
    logits = nnx.merge(graphdef, params)(tokens, positions, segments)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1))


def _unstack(scanned_params, config):
    """The scanned params in the per-layer layout (the map of models/stacking.py, applied by hand)."""
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(scanned_params)}
    out = {}
    for i in range(config.num_layers):
        where, g = scanned_location(config, i)
        for key, value in flat.items():
            if key.startswith(where + "."):
                out[f"blocks.{i}.{key[len(where) + 1:]}"] = value[...] if g is None else value[...][g]
    out.update({k: v[...] for k, v in flat.items() if not k.startswith(("layers.", "tail."))})
    return out


def test_layer_period_and_groups():
    assert layer_period((FULL,) * 5) == 1
    assert layer_period(_GEMMA3_LAYERS(26)) == 6
    assert layer_period((SLIDING, SLIDING, FULL)) == 3
    assert layer_period((FULL, SLIDING, SLIDING)) == 3  # no repetition: one group, unrolled by the scan
    config = preset("gemma3-1b")
    assert layer_groups(config) == (6, 4)  # 24 scanned + 2 tail
    assert scanned_location(config, 25) == ("tail.1", None) and scanned_location(config, 13) == ("layers.1", 2)


@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_scanned_equals_unrolled(name, layer_loop):
    """Stacked parameters run by a scan, or one slice per layer (CPU's default), equal per-layer modules."""
    scanned, unrolled = _pair(name, layer_loop)
    config = scanned.config
    # Same seed, same weights: the stacks are the per-layer weights in layer order.
    got, want = _unstack(nnx.state(scanned, nnx.Param), config), nnx.state(unrolled, nnx.Param)
    want = {".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(want)}
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)

    batch = _batch(config)
    results = []
    for model in (scanned, unrolled):
        graphdef, params = nnx.split(model, nnx.Param)
        loss, grads = jax.jit(jax.value_and_grad(_loss), static_argnums=1)(params, graphdef, *batch)
        logits = jax.jit(lambda p, t, pos, seg, g=graphdef: nnx.merge(g, p)(t, pos, seg))(params, *batch)
        results.append((logits, loss, grads))
    (logits_s, loss_s, grads_s), (logits_u, loss_u, grads_u) = results
    grads_s = _unstack(grads_s, config)
    grads_u = {".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(grads_u)}
    if name == "llama":  # the same ops in the same order: bit for bit
        np.testing.assert_array_equal(logits_s, logits_u)
        assert float(loss_s) == float(loss_u)
        for key in grads_u:
            np.testing.assert_array_equal(grads_s[key], grads_u[key], err_msg=key)
    # XLA:CPU fuses the loop body on its own, and may contract a multiply-add (biases, Gemma's x * (1 + w)
    # norm) differently from the unrolled program: fp32 rounding, 1-2 ulp per op.
    np.testing.assert_allclose(logits_s, logits_u, rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    for key in grads_u:
        np.testing.assert_allclose(grads_s[key], grads_u[key], rtol=1e-5, atol=1e-8, err_msg=key)


def test_ring_cache_chunks_of_any_length_equal_the_full_forward():
    """Gemma 3's sliding layers keep a ring of W=4 slots: chunks of 3, 2 (mixing held and new keys at start > 0),
    5 (longer than the ring) and single steps, on the scanned model's unrolled layers and on the unscanned one."""
    scanned, unrolled = _pair("gemma3")
    config = scanned.config
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, config.vocab_size)
    full = scanned(tokens)
    for model, layers in ((scanned, scanned.unrolled_layers()), (unrolled, None)):
        cache = KVCache.init(config, batch=2, max_len=14, per_layer=True)
        assert 4 in [k.shape[2] for k in cache.keys]  # a ring is in play
        logits = []
        for start, end in ((0, 3), (3, 5), (5, 10), (10, 11), (11, 12)):
            positions = jnp.broadcast_to(jnp.arange(start, end), (2, end - start))
            out, cache = model.decode(tokens[:, start:end], positions, jnp.ones((2, end - start), jnp.int32), cache,
                                      layers)
            logits.append(out)
        np.testing.assert_allclose(jnp.concatenate(logits, axis=1), full, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_cache_decode_scanned_equals_unrolled(name):
    scanned, unrolled = _pair(name)
    config = scanned.config
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, config.vocab_size)
    outs = []
    # Stacked caches on both layouts; per-layer caches on both, the scanned one run on `unrolled_layers()`.
    for model, per_layer in ((scanned, False), (unrolled, False), (scanned, True), (unrolled, True)):
        graphdef, params = nnx.split(model)

        @jax.jit
        def run(params, tokens, graphdef=graphdef, per_layer=per_layer):
            model = nnx.merge(graphdef, params)
            cache = KVCache.init(config, batch=2, max_len=12, per_layer=per_layer)
            if per_layer:  # heads-major; sliding layers keep a ring of their window
                assert cache.per_layer and [k.shape for k in cache.keys] == [
                    (2, config.num_kv_heads, n, config.head_dim) for n in layer_slots(config, 12)]
            else:
                assert cache.keys.shape == (config.num_layers, 2, config.num_kv_heads, 12, config.head_dim)
            layers = model.unrolled_layers() if per_layer else None
            positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
            first, cache = model.decode(tokens[:, :6], positions, jnp.ones((2, 6), jnp.int32), cache, layers)
            steps = []
            for t in range(6, 9):
                logits, cache = model.decode(tokens[:, t:t + 1], jnp.full((2, 1), t), jnp.ones((2, 1), jnp.int32),
                                             cache, layers)
                steps.append(logits)
            return first, jnp.concatenate(steps, axis=1), cache.keys
        outs.append(run(params, tokens))
    full = scanned(tokens)  # no cache: the same logits
    tol = dict(rtol=1e-5, atol=2e-5)
    for other in outs[1:]:
        for got, want in zip(outs[0][:2], other[:2]):
            np.testing.assert_allclose(got, want, **tol)
    np.testing.assert_allclose(outs[0][2], outs[1][2], **tol)  # the stacked caches
    for per_layer_keys in (outs[2][2], outs[3][2]):  # a ring holds the last W of the 9 slots, slot s at s % W
        for i, keys in enumerate(per_layer_keys):
            n = keys.shape[2]
            slots = np.arange(9 - n, 9) if n < 12 else np.arange(12)
            np.testing.assert_allclose(keys[:, :, slots % n], outs[0][2][i][:, :, slots], **tol)
    assert layer_slots(config, 12) == ([4, 12, 4, 12, 4] if name == "gemma3" else [12] * config.num_layers)
    np.testing.assert_allclose(outs[0][0], full[:, :6], **tol)
    np.testing.assert_allclose(outs[0][1], full[:, 6:], **tol)


def test_stacked_params_are_laid_out_and_sharded():
    config = preset("tiny-gemma3", num_layers=14, layer_types=_GEMMA3_LAYERS(14), num_kv_heads=4)
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    model = create_model(config, mesh=mesh, rules=DEFAULT_RULES)
    q = model.layers[0].attn.q  # 14 layers: two groups of Gemma 3's six, two tail layers
    assert q.shape == (2, config.hidden_size, config.num_heads, config.head_dim)
    assert q.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")
    assert q[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(model.layers) == 6 and len(model.tail) == 2
    assert model.layers[5].attn.window is None and model.layers[0].attn.window == config.sliding_window
    assert model.tail[0].attn.q.shape == (config.hidden_size, config.num_heads, config.head_dim)


def test_unstacked_sources_maps_every_prefix():
    shapes = {"params.layers.0.attn.q.value": (2, 4), "params.layers.1.attn.q.value": (2, 4),
              "params.tail.0.mlp.up.value": (4,), "opt_state.0.mu.layers.1.attn.q.value": (2, 4),
              "opt_state.0.mu.layers.0.attn.q.value": (2, 4), "params.embed.value": (8, 4), "step": ()}
    got = unstacked_sources(shapes)
    assert got["params.layers.1.attn.q.value"] == ["params.blocks.1.attn.q.value", "params.blocks.3.attn.q.value"]
    assert got["params.tail.0.mlp.up.value"] == ["params.blocks.4.mlp.up.value"]
    assert got["opt_state.0.mu.layers.0.attn.q.value"] == ["opt_state.0.mu.blocks.0.attn.q.value",
                                                            "opt_state.0.mu.blocks.2.attn.q.value"]
    assert "params.embed.value" not in got and "step" not in got


def test_remat_config_names_and_legacy_booleans():
    base = preset("tiny-llama")
    assert base.replace(remat=True).remat == "full" and base.replace(remat=False).remat == "none"
    assert base.replace(remat="True").remat == "full"
    for name in REMAT_POLICIES:
        assert base.replace(remat=name).remat == name
    with pytest.raises(ValueError, match="remat 'everything' is not one of none, full, dots"):
        base.replace(remat="everything")
    assert isinstance(base, ModelConfig)


def _batch_long(config, rows, length):
    tokens = jax.random.randint(jax.random.key(1), (rows, length), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(length), (rows, length))
    return tokens, positions, jnp.ones((rows, length), jnp.int32)


def _grads_and_temp_bytes(config, tokens, positions, segments):
    graphdef, params = nnx.split(create_model(config, seed=0), nnx.Param)
    compiled = jax.jit(jax.grad(_loss), static_argnums=1).lower(params, graphdef, tokens, positions,
                                                                 segments).compile()
    grads = compiled(params, tokens, positions, segments)
    return jax.tree.leaves(grads), compiled.memory_analysis().temp_size_in_bytes


def test_remat_policies_same_gradients_less_memory():
    config = preset("tiny-llama", num_layers=4, layer_types=(), layer_loop="scan")
    batch = _batch_long(config, rows=8, length=128)
    results = {remat: _grads_and_temp_bytes(config.replace(remat=remat), *batch) for remat in REMAT_POLICIES}
    reference, _ = results["none"]
    for remat, (grads, _) in results.items():
        for got, want in zip(grads, reference):
            # Recomputation repeats the same ops; only XLA's fusion of them may round differently.
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8, err_msg=remat)
    temps = {remat: temp for remat, (_, temp) in results.items()}
    # What each policy keeps for the backward pass, in the compiled program's temporaries (measured on
    # XLA:CPU: none 47 MiB, dots 28, dots_no_batch 19, full 14; offload's host copies count as device
    # memory on CPU, so there it equals dots_no_batch).
    assert temps["full"] < temps["dots_no_batch"] < temps["dots"] < temps["none"], temps
    assert temps["full"] < 0.4 * temps["none"], temps


def test_auto_layer_loop_scans_rematerialised_layers_on_cpu():
    # Unrolled, XLA:CPU schedules each layer's recomputation inside the forward pass, so remat keeps
    # (nearly) every activation; `layer_loop=auto` therefore scans when remat is on (measured here:
    # unrolled full 51 MiB, scan full 14 MiB, unrolled none 53 MiB).
    config = preset("tiny-llama", num_layers=4, layer_types=(), remat="full")
    batch = _batch_long(config, rows=8, length=128)
    auto_grads, auto = _grads_and_temp_bytes(config, *batch)
    _, scan = _grads_and_temp_bytes(config.replace(layer_loop="scan"), *batch)
    unrolled_grads, unrolled = _grads_and_temp_bytes(config.replace(layer_loop="unrolled"), *batch)
    assert auto == scan < 0.75 * unrolled, (auto, scan, unrolled)
    for got, want in zip(auto_grads, unrolled_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_remat_unrolled_same_gradients():
    config = preset("tiny-llama", num_layers=2, layer_types=(), scan_layers=False)
    batch = _batch_long(config, rows=2, length=16)
    reference, _ = _grads_and_temp_bytes(config, *batch)
    grads, _ = _grads_and_temp_bytes(config.replace(remat="full"), *batch)
    for got, want in zip(grads, reference):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)  # gradients are ~1e-2
