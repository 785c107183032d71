"""LoRA / QLoRA on the decoder: adapters off == base, merged == adapted, gradients only on adapters,
quantized kernels within their quantization step, adapters sharded like their kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain_jax.mesh import make_mesh
from posttrain_jax.models import create_model, preset
from posttrain_jax.models.lora import (LoraConfig, QuantizedKernel, apply_lora, base_graphdef, dense_kernel,
                                       merge_adapters, trainable_filter)

TOKENS = np.random.default_rng(0).integers(0, 512, (2, 12)).astype(np.int32)


def first_block(model):
    """Layer 0's block: `blocks[0]`, or with scanned layers the stacked `layers[0]` (leading layer axis)."""
    return model.blocks[0] if hasattr(model, "blocks") else model.layers[0]


def stacked(model) -> int:
    return 0 if hasattr(model, "blocks") else 1


def _randomise_b(model, seed=1):
    """Non-zero B so the adapters change the output (a fresh adapter is exactly zero)."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_fresh_adapters_are_identity_and_adapters_off_is_base(name):
    model = create_model(preset(name))
    base_logits = np.asarray(model(TOKENS))
    apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), base_logits)  # B = 0: exactly the base
    _randomise_b(model)
    adapted = np.asarray(model(TOKENS))
    assert np.abs(adapted - base_logits).max() > 1e-3
    # Adapters off: the base graph over the very same (not copied) base arrays.
    graphdef, _, frozen = nnx.split(model, trainable_filter(), ...)
    base = nnx.merge(base_graphdef(model), frozen)
    np.testing.assert_array_equal(np.asarray(base(TOKENS)), base_logits)
    assert first_block(base).attn.q[...] is first_block(model).attn.q[...]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_merged_weights_equal_adapted_forward(name):
    model = create_model(preset(name))
    apply_lora(model, LoraConfig(rank=4, alpha=16.0))
    _randomise_b(model)
    merged = merge_adapters(model)
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    np.testing.assert_allclose(np.asarray(merged(TOKENS)), np.asarray(model(TOKENS)), atol=2e-5, rtol=1e-5)


def test_targets_pattern_selects_projections():
    model = create_model(preset("tiny-llama"))
    apply_lora(model, LoraConfig(rank=2, targets=r"attn\.(q|v)$"))
    attn, mlp = first_block(model).attn, first_block(model).mlp
    assert hasattr(attn, "q_lora_a") and hasattr(attn, "v_lora_b") and not hasattr(attn, "k_lora_a")
    assert not hasattr(mlp, "up_lora_a")
    with pytest.raises(ValueError, match="matches no projection"):
        apply_lora(create_model(preset("tiny-llama")), LoraConfig(targets="nothing_here"))
    with pytest.raises(ValueError, match="quantize_base"):
        LoraConfig(quantize_base="int3")


def test_gradients_only_on_adapters():
    model = create_model(preset("tiny-llama"))
    apply_lora(model, LoraConfig(rank=4))
    _randomise_b(model)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(), ...)

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p, frozen)(TOKENS) ** 2)

    grads = jax.grad(loss)(trainable)
    names = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(grads)}
    assert names and all(n.split(".")[-1].endswith(("_lora_a", "_lora_b")) for n in names)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    num_base = sum(x.size for x in jax.tree.leaves(frozen))
    num_adapter = sum(x.size for x in jax.tree.leaves(trainable))
    assert num_adapter < 0.2 * num_base


@pytest.mark.parametrize("qtype", ["int8", "nf4"])
def test_quantized_base_within_quantization_step(qtype):
    cfg = preset("tiny-llama", hidden_size=128, intermediate_size=256)
    model = create_model(cfg)
    dense = {n: np.asarray(getattr(first_block(model).mlp if n in ("gate", "up", "down") else first_block(model).attn,
                                   n)[...]) for n in ("q", "o", "gate", "down")}
    reference = np.asarray(model(TOKENS))
    apply_lora(model, LoraConfig(rank=4, quantize_base=qtype))
    for name, w in dense.items():
        module = first_block(model).mlp if name in ("gate", "down") else first_block(model).attn
        assert isinstance(getattr(module, name), QuantizedKernel)
        scale = np.asarray(getattr(module, name + "_scale")[...])
        err = np.abs(np.asarray(dense_kernel(module, name)) - w)
        # Broadcast each scale over its block: the error of every weight is bounded by its own block's step.
        step = scale
        for axis, (full, part) in enumerate(zip(w.shape, scale.shape)):
            step = np.repeat(step, full // part, axis=axis)
        # int8: absmax/127 per level, round-to-nearest -> half a level; nf4: the widest NF4 gap is
        # 1 - 0.6962 (between the two largest-magnitude levels), half of it times the block absmax.
        bound = 0.5 * step if qtype == "int8" else 0.5 * (1.0 - 0.6961928009986877) * step
        assert np.all(err <= bound * (1 + 1e-5) + 1e-8), (name, float((err - bound).max()))
    # The forward is the fp32 forward of the dequantized kernels: compare to the dense model carrying them.
    logits = np.asarray(model(TOKENS))
    relative = np.abs(logits - reference).max() / np.abs(reference).max()
    assert relative < (0.05 if qtype == "int8" else 0.5)
    merged = merge_adapters(model)
    np.testing.assert_allclose(np.asarray(merged(TOKENS)), logits, atol=2e-5, rtol=1e-5)


def test_adapters_sharded_like_their_kernels():
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    model = create_model(preset("tiny-llama"), mesh=mesh)
    apply_lora(model, LoraConfig(rank=4, quantize_base="nf4"), mesh=mesh)
    attn, mlp = first_block(model).attn, first_block(model).mlp
    lead = stacked(model)

    def spec(x):  # per-layer part of the spec (a stacked layer axis is never sharded)
        full = tuple(x[...].sharding.spec) + (None,) * x[...].ndim
        assert all(axis is None for axis in full[:lead])
        return full[lead:x[...].ndim]

    assert spec(attn.q_lora_a) == ("fsdp", None)
    assert spec(attn.q_lora_b) == (None, "tensor", None)
    assert spec(mlp.down_lora_a) == ("tensor", None)
    assert spec(attn.q) == ("fsdp", "tensor", None)  # the nf4 codes keep the kernel's sharding
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda m, t: m(t))(model, TOKENS)
    assert np.isfinite(np.asarray(logits)).all()
