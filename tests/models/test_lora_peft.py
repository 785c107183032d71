"""LoRA interop with the real thing: merged export vs transformers, PEFT adapter vs peft, PEFT import."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from posttrain_jax.models import load_hf
from posttrain_jax.models.lora import LoraConfig, apply_lora
from posttrain_jax.models.lora_io import export_merged, read_peft_adapter, read_peft_config, write_peft_adapter
from tests.models.hf_fixtures import VOCAB, hf_logits, make_hf_model

TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 14)).astype(np.int32)


def _trained_like(model, seed=3):
    """Random non-zero adapters (a fresh B is zero, which would make every check trivial)."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                                   for x, k in zip(leaves, keys)]))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_peft_adapter_and_merged_export_match(family, tmp_path):
    base_dir = tmp_path / "base"
    hf_model = make_hf_model(family, base_dir)
    cfg = LoraConfig(rank=4, alpha=12.0)
    model = apply_lora(load_hf(str(base_dir)), cfg)
    _trained_like(model)
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    assert np.abs(ours - hf_logits(hf_model, TOKENS)).max() > 1e-3  # the adapters matter

    write_peft_adapter(model, cfg, str(tmp_path / "adapter"), base_model=str(base_dir))
    with_adapter = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(hf_logits(with_adapter, TOKENS), ours, atol=1e-4, rtol=1e-4)

    export_merged(model, str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    np.testing.assert_allclose(hf_logits(merged, TOKENS), ours, atol=1e-4, rtol=1e-4)

    # Import the adapter back (continue training from a PEFT adapter): identical arrays and logits.
    imported_cfg = read_peft_config(str(tmp_path / "adapter"))
    assert (imported_cfg.rank, imported_cfg.alpha) == (4, 12.0)
    again = read_peft_adapter(apply_lora(load_hf(str(base_dir)), imported_cfg), str(tmp_path / "adapter"))
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)), jax.tree.leaves(nnx.state(again,
                                                                                              nnx.LoRAParam))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_import_adapter_made_by_peft(tmp_path):
    """An adapter trained with PEFT (here: randomised) applies to our model with peft's logits."""
    hf_model = make_hf_model("llama", tmp_path / "base")
    lora = peft.LoraConfig(r=3, lora_alpha=7, target_modules=["q_proj", "v_proj", "down_proj"],
                           task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf_model, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    cfg = read_peft_config(str(tmp_path / "adapter"))
    model = read_peft_adapter(apply_lora(load_hf(str(tmp_path / "base")), cfg), str(tmp_path / "adapter"))
    block = model.blocks[0] if hasattr(model, "blocks") else model.layers[0]
    assert not hasattr(block.attn, "k_lora_a") and hasattr(block.mlp, "down_lora_b")
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), hf_logits(peft_model.eval(), TOKENS),
                               atol=1e-4, rtol=1e-4)


def test_adapter_mismatch_is_named(tmp_path):
    make_hf_model("llama", tmp_path / "base")
    model = apply_lora(load_hf(str(tmp_path / "base")), LoraConfig(rank=4))
    write_peft_adapter(model, LoraConfig(rank=4), str(tmp_path / "adapter"))
    other = apply_lora(load_hf(str(tmp_path / "base")), LoraConfig(rank=8))
    with pytest.raises(ValueError, match="rank 8"):
        read_peft_adapter(other, str(tmp_path / "adapter"))
