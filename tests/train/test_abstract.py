"""The abstract train state is the real one without the arrays."""

import jax
import pytest

from posttrain_jax.mesh import make_mesh
from posttrain_jax.models import create_model, preset
from posttrain_jax.sharding import DEFAULT_RULES
from posttrain_jax.train import init_train_state, make_optimizer
from posttrain_jax.train import abstract_lora_train_state, abstract_train_state


@pytest.mark.parametrize("name,shape,ema", [("tiny-llama", {"data": 2, "fsdp": 2, "tensor": 2}, True),
                                            ("tiny-gemma3", {"fsdp": 8}, False),
                                            ("tiny-qwen2", {"data": 2, "fsdp": 4}, False)])
def test_abstract_state_equals_real(name, shape, ema):
    mesh = make_mesh(shape)
    config = preset(name)
    tx, _ = make_optimizer(learning_rate=1e-3, total_steps=10, weight_decay=0.1)
    graphdef, real = init_train_state(create_model(config, mesh=mesh), tx, mesh=mesh, ema=ema)
    abstract_graphdef, abstract = abstract_train_state(config, tx, mesh, DEFAULT_RULES, ema=ema)
    assert abstract_graphdef == graphdef
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    real_leaves = jax.tree_util.tree_leaves_with_path(real)
    abstract_leaves = jax.tree.leaves(abstract)
    assert len(real_leaves) == len(abstract_leaves) > 10
    for (path, want), got in zip(real_leaves, abstract_leaves):
        where = jax.tree_util.keystr(path)
        assert isinstance(got, jax.ShapeDtypeStruct), where
        assert (got.shape, got.dtype) == (want.shape, want.dtype), where
        assert got.sharding.mesh == want.sharding.mesh, where
        assert got.sharding.is_equivalent_to(want.sharding, want.ndim), f"{where}: {got.sharding} vs {want.sharding}"


def _check_equal(real, abstract):
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    real_leaves = jax.tree_util.tree_leaves_with_path(real)
    abstract_leaves = jax.tree.leaves(abstract)
    assert len(real_leaves) == len(abstract_leaves)
    for (path, want), got in zip(real_leaves, abstract_leaves):
        where = jax.tree_util.keystr(path)
        assert isinstance(got, jax.ShapeDtypeStruct), where
        assert (got.shape, got.dtype) == (want.shape, want.dtype), where
        assert got.sharding.is_equivalent_to(want.sharding, want.ndim), f"{where}: {got.sharding} vs {want.sharding}"


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_abstract_lora_state_and_base_equal_real(quantize):
    """What `posttrain-jax compile` plans for a LoRA / QLoRA run is what the trainers build: adapters in the
    train state, the (quantized) base apart."""
    from posttrain_jax.models.lora import LoraConfig, apply_lora
    from posttrain_jax.train import trainable_split
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config = preset("tiny-llama")
    lora = LoraConfig(rank=4, alpha=8.0, quantize_base=quantize)
    tx, _ = make_optimizer(learning_rate=1e-3, total_steps=10)
    model = apply_lora(create_model(config, mesh=mesh), lora, mesh=mesh, rules=DEFAULT_RULES)
    trainable, base, _ = trainable_split(model)
    graphdef, real = init_train_state(model, tx, mesh=mesh, trainable=trainable)
    abstract_graphdef, abstract, abstract_base = abstract_lora_train_state(config, tx, lora, mesh, DEFAULT_RULES)
    assert abstract_graphdef == graphdef
    _check_equal(real, abstract)
    _check_equal(base, abstract_base)
    assert all("lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract.params))


def test_abstract_state_needs_no_memory():
    """An 8B state on 8 CPU devices: planned in a second, nothing allocated."""
    mesh = make_mesh({"fsdp": 8})
    tx, _ = make_optimizer(learning_rate=1e-5, total_steps=10)
    _, state = abstract_train_state(preset("llama3.1-8b"), tx, mesh)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    assert 8.0e9 < params < 8.1e9
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 2 and x.shape[0] == 128256]
    assert moments and all(m.sharding.spec[1] == "fsdp" for m in moments)
