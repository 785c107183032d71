"""LoRA / QLoRA runs of every trainer: only adapters in the run state and checkpoints, exact resume,
8-device sharding, adapters-off references, exports (merged and PEFT) and sampling from an adapter run."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain_jax.checkpointing import load_params, read_metadata, resolve_step_dir
from posttrain_jax.models.lora import QuantizedKernel, has_adapters
from posttrain_jax.trainers import sft
from posttrain_jax.trainers.export import export_checkpoint
from posttrain_jax.models.from_config import load_checkpoint_model
from tests.models.test_lora import first_block
from tests.trainers import sft_helpers
from tests.trainers.sft_helpers import read_metrics

MESH = "--config.mesh={'data': 2, 'fsdp': 2, 'tensor': 2}"


def small_config(out, *extra):
    return sft_helpers.small_config(out, *sft_helpers.LORA, *extra)


def _leaf_names(tree):
    return [".".join(str(getattr(k, "key", k)) for k in path) for path, _ in
            jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_sft")
    summary = sft.main(small_config(out, "--config.train.steps=6", "--config.train.checkpoint_every=3", MESH))
    return out, summary


def test_lora_sft_trains_only_adapters_on_8_devices(lora_run):
    out, summary = lora_run
    rows = read_metrics(out)
    assert rows[6]["train/loss"] < rows[1]["train/loss"]
    assert summary["compilations"] == 1
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    # The checkpoint's params and optimizer moments hold adapters only; the metadata names the base.
    params = load_params(os.path.join(out, "checkpoints"))
    names = _leaf_names(params)
    assert names and all("_lora_" in n for n in names), names[:5]
    meta = read_metadata(resolve_step_dir(os.path.join(out, "checkpoints")))
    assert meta["lora"]["config"]["rank"] == 4 and meta["lora"]["base"]["preset"] == "quickstart"
    stored = sorted(os.listdir(os.path.join(out, "checkpoints", "6", "state")))
    assert stored  # Orbax wrote it
    # The trained model = base (rebuilt from the recorded reference, untouched) + trained adapters.
    model = load_checkpoint_model(os.path.join(out, "checkpoints"))
    assert has_adapters(model)
    fresh = sft.build_model(small_config(out).model, None, sft.mesh_and_rules(small_config(out))[1], seed=0)
    np.testing.assert_array_equal(np.asarray(first_block(model).attn.q[...]),
                                  np.asarray(first_block(fresh).attn.q[...]))
    assert float(jnp.abs(first_block(model).attn.q_lora_b[...]).max()) > 0  # B moved off zero


def test_lora_resume_is_exact(lora_run, tmp_path):
    """Resume from step 3's adapters-only checkpoint: the same losses and adapters at step 6."""
    out, _ = lora_run
    shutil.copytree(os.path.join(out, "data"), tmp_path / "data")
    os.makedirs(tmp_path / "checkpoints")
    shutil.copytree(os.path.join(out, "checkpoints", "3"), tmp_path / "checkpoints" / "3")
    sft.main(small_config(tmp_path, "--config.train.steps=6", "--config.train.checkpoint_every=3", MESH),
             resume=True)
    a, b = read_metrics(out), read_metrics(tmp_path)
    for step in (4, 5, 6):
        assert a[step]["train/loss"] == b[step]["train/loss"]
    for x, y in zip(jax.tree.leaves(load_params(os.path.join(out, "checkpoints"), 6)),
                    jax.tree.leaves(load_params(str(tmp_path / "checkpoints"), 6))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_merged_and_peft_from_run(lora_run, tmp_path):
    import peft
    import torch
    import transformers
    out, _ = lora_run
    model = load_checkpoint_model(os.path.join(out, "checkpoints"))
    tokens = np.random.RandomState(0).randint(4, 500, (2, 16))
    ours = np.asarray(model(jnp.asarray(tokens)))
    export_checkpoint(os.path.join(out, "checkpoints"), str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(tokens)).logits.numpy(), ours, atol=1e-4, rtol=1e-4)
    # PEFT: the adapter applied by peft to the (exported) base gives the same logits.
    from posttrain_jax.models import export_hf
    from posttrain_jax.models.lora import base_graphdef
    _, _, frozen = nnx.split(model, nnx.LoRAParam, ...)
    export_hf(nnx.merge(base_graphdef(model), frozen), str(tmp_path / "base"))
    export_checkpoint(os.path.join(out, "checkpoints"), str(tmp_path / "adapter"), peft=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
    with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(with_adapter(torch.tensor(tokens)).logits.numpy(), ours, atol=1e-4, rtol=1e-4)


def test_qlora_sft_pulse(tmp_path):
    """nf4 base quantized once at load; only adapters trained; loss falls; one compilation."""
    summary = sft.main(small_config(tmp_path, "--config.train.steps=6", "--config.lora.quantize_base=nf4",
                                    "--config.mesh={'data': 1, 'fsdp': 4, 'tensor': 2}", "--config.lora.dropout=0.1"))
    rows = read_metrics(tmp_path)
    assert rows[6]["train/loss"] < rows[1]["train/loss"]
    assert summary["compilations"] == 1
    model = load_checkpoint_model(str(tmp_path / "checkpoints"))
    assert isinstance(first_block(model).mlp.down, QuantizedKernel)
    assert all("_lora_" in n for n in _leaf_names(load_params(str(tmp_path / "checkpoints"))))
