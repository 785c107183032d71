"""Every shipped config loads and uses only keys its trainer knows."""

import glob
import importlib
import os

import pytest

from posttrain_jax import ablation
from posttrain_jax.config import check_keys, load_config
from posttrain_jax.trainers import dpo, rm, sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*.py")))


def _trainer(path):
    name = os.path.basename(path)
    if os.path.basename(os.path.dirname(path)) == "rl" or name.startswith("rlvr"):
        return importlib.import_module("posttrain_jax.trainers.rl")
    if name.startswith("grpo") or os.path.basename(os.path.dirname(path)) == "grpo":
        return importlib.import_module("posttrain_jax.trainers.grpo")
    if name.startswith("iterative") or name.startswith("pipeline"):
        return importlib.import_module("posttrain_jax.trainers.pipeline")
    if name.startswith("distill"):
        return importlib.import_module("posttrain_jax.trainers.distill")
    if name.startswith("eval"):
        return importlib.import_module("posttrain_jax.eval.command")
    if name.startswith("rejection"):
        return importlib.import_module("posttrain_jax.trainers.rejection")
    if name.startswith("sft"):
        return sft
    if name.startswith("dpo"):
        return dpo
    if name.startswith("rm"):
        return rm
    if "ablation" in name:
        return ablation
    raise AssertionError(f"no trainer known for {path}")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_loads_with_known_keys(path):
    config = load_config(path)
    check_keys(config, _trainer(path).default_config())


def test_pipeline_configs_stage_overrides_are_valid_trainer_keys():
    from posttrain_jax.trainers.pipeline import validate_overrides
    for name in ("configs/llama3/iterative.py", "configs/quickstart/pipeline.py"):
        validate_overrides(load_config(os.path.join(ROOT, name)))
    c = load_config(os.path.join(ROOT, "configs/llama3/iterative.py"))
    assert (c.rounds, c.rejection.overrides.rejection.num_samples, c.sft.init, c.dpo.overrides.train.beta,
            c.dpo.overrides.train.nll_coef, c.dpo.overrides.optim.learning_rate) == (6, 20, "base", 0.1, 0.2, 1e-5)


def test_tulu3_recipes():
    sft8 = load_config(os.path.join(ROOT, "configs/tulu3/sft_8b.py"))
    assert (sft8.optim.learning_rate, sft8.train.global_batch, sft8.data.seq_len, sft8.data.epochs,
            sft8.optim.schedule, sft8.optim.warmup_ratio, sft8.train.loss_aggregation) == (
        5e-6, 128, 4096, 2.0, "linear", 0.03, "sum")
    dpo8 = load_config(os.path.join(ROOT, "configs/tulu3/dpo_8b.py"))
    assert (dpo8.train.loss_type, dpo8.train.beta, dpo8.optim.learning_rate, dpo8.train.global_pairs,
            dpo8.optim.warmup_ratio, dpo8.train.nll_coef) == ("dpo_norm", 5.0, 5e-7, 128, 0.1, 0.0)
    assert len(CONFIGS) >= 8
