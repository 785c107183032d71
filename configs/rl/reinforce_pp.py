"""Quickstart: REINFORCE++ (discounted returns whitened over the batch, k2 KL in the reward; verl) on the synthetic arithmetic task.

Run after the SFT quickstart (`posttrain-jax sft`), which it starts from:
    posttrain-jax rl --config configs/rl/reinforce_pp.py
It prints held-out accuracy before and after (greedy, and pass@1 sampled at the training temperature).
"""

from posttrain_jax.trainers.rl import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/rl-reinforce_pp-quickstart"
    c.rl.algorithm = "reinforce_pp"
    c.train.steps = 60
    return c
