"""Mesh construction, logical-axis rules and sharded execution on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from posttrain_jax.mesh import make_mesh, resolve_mesh_shape
from posttrain_jax.models import create_model, load_hf, preset
from posttrain_jax.sharding import DEFAULT_RULES, logical_rules, logical_to_spec, shard_batch

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
# Every sharded dimension divisible by 8: heads 8, kv heads 8 (Llama-style but full MHA on kv).
CONFIG = preset("tiny-llama", num_heads=8, num_kv_heads=8, head_dim=8, hidden_size=64, intermediate_size=128)


def _mesh(shape):
    return make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))


def _flat(model):
    out = {}
    for path, var in jax.tree_util.tree_flatten_with_path(
            nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        out[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = var
    return out


@pytest.mark.parametrize("shape", MESHES)
def test_param_shardings_follow_rules(shape):
    mesh = _mesh(shape)
    model = create_model(CONFIG, mesh=mesh)
    data, fsdp, tensor = shape
    fs = "fsdp" if fsdp > 1 else None
    tp = "tensor" if tensor > 1 else None
    expected = {  # written out by hand from DEFAULT_RULES, with size-1 axes simply unused
        # Scanned layers: a leading "layers" axis that is never sharded.
        "embed": (tp, fs), "lm_head": (fs, tp), "layers.0.attn.q": (None, fs, tp, None),
        "layers.0.attn.k": (None, fs, tp, None), "layers.0.attn.o": (None, tp, None, fs),
        "layers.0.mlp.gate": (None, fs, tp), "layers.0.mlp.down": (None, tp, fs),
        "layers.0.attn_norm.scale": (None, None), "final_norm.scale": (None,),
    }
    flat = _flat(model)
    for name, spec in expected.items():
        array = flat[name][...]
        actual = tuple(a if mesh.shape.get(a, 1) > 1 else None for a in
                       (tuple(array.sharding.spec) + (None,) * array.ndim)[:array.ndim])
        assert actual == spec, (shape, name, array.sharding.spec)
        # The device buffers really are the split pieces.
        parts = [mesh.shape[a] if a else 1 for a in spec]
        assert array.addressable_shards[0].data.shape == tuple(d // p for d, p in zip(array.shape, parts))
    for name, var in flat.items():
        names = var.get_metadata()["logical_axes"]
        assert var[...].sharding.spec == logical_to_spec(names, DEFAULT_RULES, mesh.axis_names), name


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_forward_equals_single_device(shape):
    mesh = _mesh(shape)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, CONFIG.vocab_size, (8, 16)))
    reference = np.asarray(create_model(CONFIG, seed=3)(tokens))
    model = create_model(CONFIG, mesh=mesh, seed=3)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, batch):
        return nnx.merge(graphdef, state)(batch["tokens"])

    with jax.set_mesh(mesh), logical_rules(DEFAULT_RULES):
        batch = shard_batch({"tokens": np.asarray(tokens)}, mesh)
        out = forward(state, batch)
    assert out.sharding.spec[0] is not None or shape[0] * shape[1] == 1  # batch stays sharded
    np.testing.assert_allclose(np.asarray(out), reference, atol=1e-5, rtol=0)


def test_sharded_hf_load_places_shards(tmp_path):
    from tests.models.hf_fixtures import make_hf_model
    make_hf_model("qwen3", tmp_path)
    mesh = _mesh((2, 2, 2))
    sharded, single = load_hf(str(tmp_path), mesh=mesh), load_hf(str(tmp_path))
    q = sharded.layers[0].attn.q[...]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None) and len(q.addressable_shards) == 8
    for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(single))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mesh_fill_and_errors():
    assert resolve_mesh_shape({"data": 2, "tensor": -1}, 8) == (2, 1, 4)
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ValueError, match=r"needs 3 devices but 8 are available"):
        make_mesh({"data": 3})
    with pytest.raises(ValueError, match=r"do not divide the 8 available devices"):
        make_mesh({"data": 3, "fsdp": -1})
    with pytest.raises(ValueError, match=r"needs 2 devices but 3 are available"):
        make_mesh({"data": 2}, devices=jax.devices()[:3])
    with pytest.raises(ValueError, match=r"only one mesh axis may be -1"):
        make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
        make_mesh({"model": 8})


def test_heads_not_divisible_by_tensor_axis_says_what_to_change():
    config = CONFIG.replace(num_heads=4, num_kv_heads=4, head_dim=16)
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.[qk]: dimension 2 \('(kv_)?heads', size 4\) cannot be split "
                                         r"over mesh axes tensor of total size 8.*map '(kv_)?heads' to other axes"):
        create_model(config, mesh=_mesh((1, 1, 8)))
    # The remedy the message names works: replicate kv heads, shard the rest.
    rules = (("kv_heads", None),) + DEFAULT_RULES
    model = create_model(CONFIG.replace(num_kv_heads=2), mesh=_mesh((1, 1, 8)), rules=rules)
    assert model.layers[0].attn.k[...].sharding.spec[2] is None  # kv heads replicated


def test_logical_to_spec_never_reuses_a_mesh_axis():
    rules = (("a", "fsdp"), ("b", ("fsdp", "tensor")), ("c", "tensor"))
    assert logical_to_spec(("a", "b", "c"), rules) == P("fsdp", None, "tensor")
    assert logical_to_spec(("b", "c"), rules) == P(("fsdp", "tensor"), None)
    assert logical_to_spec(("unknown", None), rules) == P(None, None)


def test_shard_batch_splits_rows_and_checks_divisibility():
    mesh = _mesh((2, 2, 2))
    batch = shard_batch({"tokens": np.arange(8 * 4).reshape(8, 4), "weights": np.ones(8)}, mesh)
    assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
    assert batch["tokens"].addressable_shards[0].data.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), np.arange(32).reshape(8, 4))
    with pytest.raises(ValueError, match=r"batch key 'tokens': global batch 6 rows is not divisible by the 4"):
        shard_batch({"tokens": np.zeros((6, 4))}, mesh)
