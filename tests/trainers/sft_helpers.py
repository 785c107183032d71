"""A small SFT quickstart run for the trainer tests: its overrides, its config and its metrics."""

import json
import os

from posttrain_jax.config import apply_overrides
from posttrain_jax.trainers import sft

# 700 training rows of the quickstart task, 16 per step: a few seconds a step on CPU.
SMALL = ["--config.data.quickstart_num_train=700", "--config.data.quickstart_num_eval=40",
         "--config.train.global_batch=16", "--config.train.log_every=1"]
# LoRA on top (a larger learning rate: only the adapters train).
LORA = ["--config.optim.learning_rate=1e-2", "--config.lora.enabled=True", "--config.lora.rank=4",
        "--config.lora.alpha=8.0"]


def small_config(out, *extra):
    """The SFT default config writing to `out`, with SMALL and then `extra` (command-line overrides) applied."""
    return apply_overrides(sft.default_config(), [f"--config.output_dir={out}", *SMALL, *extra])


def read_metrics(out) -> dict:
    """step -> the training-metrics row of run directory `out`'s metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r for r in rows if "train/loss" in r}
