"""Quickstart: GSPO (group advantages, length-normalised sequence ratio clipped at 3e-4 / 4e-4; Qwen 3) on the synthetic arithmetic task.

Run after the SFT quickstart (`posttrain-jax sft`), which it starts from:
    posttrain-jax rl --config configs/rl/gspo.py
It prints held-out accuracy before and after (greedy, and pass@1 sampled at the training temperature).
"""

from posttrain_jax.trainers.rl import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/rl-gspo-quickstart"
    c.rl.algorithm = "gspo"
    c.train.steps = 60
    return c
