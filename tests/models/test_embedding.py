"""The embedding lookup keeps the table and its gradient sharded, and equals `jnp.take`."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain_jax.mesh import make_mesh
from posttrain_jax.models import create_model, preset
from posttrain_jax.models.embedding import embed_lookup
from posttrain_jax.sharding import DEFAULT_RULES, batch_sharding, logical_rules, logical_to_spec

MESHES = [{"fsdp": 8}, {"data": 2, "fsdp": 4}, {"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2},
          {"data": 8}, {"data": 4, "tensor": 2}]
_COLLECTIVE = re.compile(r"=\s*(\([^=]*\)|\S+)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                         r"(-start)?\(")


def _lookup_and_grad(table, tokens, weights, dtype):
    def loss(t):
        x = embed_lookup(t, tokens, dtype)
        return jnp.sum(x.astype(jnp.float32) * weights), x
    return jax.value_and_grad(loss, has_aux=True)(table)


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("batch", [8, 1])  # 1: smaller than the batch axes (decode), the GSPMD path
def test_lookup_and_gradient_equal_take(shape, batch):
    mesh = make_mesh(shape)
    vocab, hidden = 64, 32
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(vocab, hidden)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, vocab, size=(batch, 6)), jnp.int32)
    tokens = tokens.at[0, :3].set(jnp.array([0, vocab - 1, 5]))  # both ends of the vocabulary, and a repeat below
    tokens = tokens.at[-1, -1].set(5)
    weights = jnp.asarray(rng.normal(size=(batch, 6, hidden)), jnp.float32)
    (_, want_x), want_grad = jax.jit(_lookup_and_grad, static_argnums=3)(table, tokens, weights, jnp.float32)
    spec = logical_to_spec(("vocab", "embed"), DEFAULT_RULES, mesh.axis_names)
    sharded = jax.device_put(table, jax.sharding.NamedSharding(mesh, spec))
    with jax.set_mesh(mesh), logical_rules(DEFAULT_RULES):
        (_, x), grad = jax.jit(_lookup_and_grad, static_argnums=3)(sharded, tokens, weights, jnp.float32)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want_x))  # a lookup: bit-exact
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-6, atol=1e-6)
    assert grad.sharding.spec == sharded.sharding.spec


def _collectives(hlo: str):
    """(op, largest element count among its results) for every collective in compiled HLO text."""
    found = []
    for line in hlo.splitlines():
        match = _COLLECTIVE.search(line)
        if match:
            sizes = [int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                     for dims in re.findall(r"\[([\d,]*)\]", match.group(1))]
            found.append((match.group(2), max(sizes or [0])))
    return found


@pytest.mark.parametrize("shape", MESHES[:4], ids=str)
def test_compiled_step_never_replicates_the_table(shape):
    """In the compiled gradient of the whole model no collective moves a full [vocab, hidden] table."""
    mesh = make_mesh(shape)
    vocab, hidden = 1024, 256  # the table is 4x larger than any other tensor in this model
    cfg = preset("tiny-llama", vocab_size=vocab, hidden_size=hidden, num_layers=1, layer_types=())
    graphdef, params = nnx.split(create_model(cfg, mesh=mesh), nnx.Param)

    def loss(p, tokens):
        return jnp.sum(nnx.merge(graphdef, p).hidden_states(tokens)[0].astype(jnp.float32) ** 2)

    tokens = jax.device_put(jnp.zeros((8, 16), jnp.int32), batch_sharding(mesh))
    shardings = jax.tree.map(lambda a: a.sharding, params)
    with jax.set_mesh(mesh), logical_rules(DEFAULT_RULES):
        hlo = jax.jit(jax.grad(loss), out_shardings=shardings).lower(params, tokens).compile().as_text()
    collectives = _collectives(hlo)
    assert collectives, "expected the FSDP all-gathers of the layer weights"
    shard = vocab * hidden // (mesh.shape["fsdp"] * mesh.shape["tensor"])
    too_big = [(op, n) for op, n in collectives if n > shard and n >= vocab * hidden // 2]
    assert not too_big, f"collectives larger than one table shard ({shard} elements): {too_big}"
