"""Quickstart: GRPO (group-normalised advantages, token ratio; DeepSeekMath) on the synthetic arithmetic task.

Run after the SFT quickstart (`posttrain-jax sft`), which it starts from:
    posttrain-jax rl --config configs/rl/grpo.py
It prints held-out accuracy before and after (greedy, and pass@1 sampled at the training temperature).
"""

from posttrain_jax.trainers.rl import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/rl-grpo-quickstart"
    c.rl.algorithm = "grpo"
    c.train.steps = 60
    return c
