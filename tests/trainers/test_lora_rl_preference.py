"""LoRA for RM, DPO and GRPO: what is trained, references = base with adapters off, sampling adapter runs."""

import json

import jax
import numpy as np
from flax import nnx

from posttrain_jax.checkpointing import load_params
from posttrain_jax.trainers import dpo, grpo, rejection, rm
from tests.trainers.test_grpo import _config as grpo_config
from tests.trainers.test_grpo import task  # noqa: F401  (module fixture)
from tests.trainers.test_preference_trainers import _config as preference_config
from tests.trainers.test_preference_trainers import toy  # noqa: F401  (module fixture)

LORA = ["--config.lora.enabled=True", "--config.lora.rank=4", "--config.lora.alpha=8.0"]


def _names(tree):
    return [".".join(str(getattr(k, "key", k)) for k in path) for path, _ in
            jax.tree_util.tree_flatten_with_path(tree)[0]]


def _train_rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl") if '"train/loss"' in line]


def test_lora_reward_model_trains_adapters_and_head(tmp_path, toy):  # noqa: F811
    summary = rm.main(preference_config(rm, tmp_path, toy, "--config.train.steps=12",
                                        "--config.optim.learning_rate=1e-2", *LORA))
    assert summary["eval_after"]["accuracy"] > summary["eval_before"]["accuracy"]
    names = _names(load_params(str(tmp_path / "checkpoints")))
    assert any(n.startswith("score") for n in names)
    assert all("_lora_" in n or n.startswith("score") for n in names)
    assert summary["compilations"] == 1


def test_lora_dpo_reference_is_the_base(tmp_path, toy):  # noqa: F811
    """Fresh adapters: the policy is the base, so every implicit reward is 0 at step 1 (to the fp32 rounding
    of two differently fused programs summing log-probs of ~-50), and clearly not 0 once trained."""
    summary = dpo.main(preference_config(dpo, tmp_path, toy, "--config.train.steps=6",
                                         "--config.optim.learning_rate=1e-2", *LORA))
    rows = _train_rows(tmp_path)
    assert abs(rows[0]["train/rewards_chosen"]) < 1e-6 and abs(rows[0]["train/rewards_rejected"]) < 1e-6
    assert abs(rows[-1]["train/rewards_margin"]) > 1e-3
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert summary["eval_after"]["rewards_accuracy"] >= summary["eval_before"]["rewards_accuracy"]
    assert all("_lora_" in n for n in _names(load_params(str(tmp_path / "checkpoints"))))


def test_lora_grpo_kl_reference_is_the_base_and_adapter_run_samples(tmp_path, task, capsys):  # noqa: F811
    """QLoRA (nf4 base) GRPO on the (2,2,2) mesh (a LoRA PPO run: tests/rl/test_rl_trainer.py)."""
    summary = grpo.main(grpo_config(tmp_path / "grpo", task, "--config.train.steps=2", "--config.grpo.beta=0.04",
                                    "--config.optim.learning_rate=1e-2", "--config.lora.quantize_base=nf4", *LORA))
    history = summary["history"]
    # Step 1 trains the fresh adapters: policy == base == reference (to fusion rounding); then they differ.
    assert history[0]["train/kl"] < 1e-8 < history[1]["train/kl"]
    assert summary["compilations"]["train_step"] == 1
    assert all("_lora_" in n for n in _names(load_params(str(tmp_path / "grpo" / "checkpoints"))))
    # The returned params are the whole adapted model (adapters + the base arrays, not a copy).
    assert any(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(summary["params"],
                                                                      is_leaf=lambda x: isinstance(x, nnx.Variable)))
    # rejection-sample reads the adapter run: base + adapters, no merge.
    d, tokenizer = task
    from posttrain_jax.config import apply_overrides
    config = apply_overrides(rejection.default_config(), [
        f"--config.output_dir={tmp_path / 'rs'}", "--config.data.quickstart_task=False",
        f"--config.tokenizer={tokenizer}", f"--config.data.path={d}/eval.jsonl",
        f"--config.model.checkpoint={tmp_path / 'grpo' / 'checkpoints'}", "--config.rejection.num_samples=2",
        "--config.rejection.prompts_per_batch=8", "--config.sampling.max_new_tokens=6",
        "--config.mesh={'data': 2, 'fsdp': 2, 'tensor': 2}"])
    out = rejection.main(config)
    assert out["prompts"] == 16 and np.isfinite(out["mean_score"])
    # `sample` reads it as base + the saved adapters (unmerged): the trained policy.
    from posttrain_jax.models.lora import has_adapters
    from posttrain_jax.sampling.command import load_for_sampling
    from posttrain_jax.sampling.command import main as sample_main
    loaded, _, _ = load_for_sampling(str(tmp_path / "grpo"), None, None)
    assert has_adapters(loaded)
    tokens = np.arange(1, 13, dtype=np.int32).reshape(2, 6)
    positions, segments = np.tile(np.arange(6, dtype=np.int32), (2, 1)), np.ones((2, 6), np.int32)
    trained = nnx.merge(summary["graphdef"], jax.device_get(summary["params"]))
    for a, b in zip(*(jax.tree.leaves(nnx.state(m, nnx.LoRAParam)) for m in (loaded, trained))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The base (preset + seed, then nf4) is re-initialised on one device here, on the 8-device mesh in training:
    # the float kernels agree to 1 ulp (init rounding), the logits to float32 rounding.
    np.testing.assert_allclose(np.asarray(loaded(tokens, positions, segments)),
                               np.asarray(trained(tokens, positions, segments)), atol=2e-6, rtol=0)
    sample_main(["--checkpoint", str(tmp_path / "grpo"), "--prompt", "What is 2 plus 3?", "--greedy",
                 "--max-new-tokens", "4"])
    assert ">>> What is 2 plus 3?" in capsys.readouterr().out
