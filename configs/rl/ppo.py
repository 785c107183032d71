"""Quickstart: PPO with a critic (GAE, whitened advantages, clipped value loss, k1 KL in the reward).

Run after the SFT quickstart (`posttrain-jax sft`), which it starts from; the critic starts from
the same weights with a fresh scalar head (set critic.checkpoint=runs/rm-quickstart/checkpoints
after `posttrain-jax rm` to start it from the reward model, as Tülu 3 does):
    posttrain-jax rl --config configs/rl/ppo.py
It prints held-out accuracy before and after; the metrics show the value loss falling and the
explained variance rising as the critic learns. The prompts use operands up to 29, where the SFT
model (trained up to 19) fails on the new numbers: prompts then differ in how likely they succeed,
which is what a critic can learn (on operands up to 19 the outcome is a coin flip of the sampling
temperature and no critic explains it: explained variance stays at ~0).
"""

from posttrain_jax.trainers.rl import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/rl-ppo-quickstart"
    c.rl.algorithm = "ppo"
    c.rl.num_epochs = 2
    c.rl.num_minibatches = 2
    c.rl.kl_coef = 0.01
    c.critic.learning_rate = 3e-4
    c.data.quickstart_max_operand = 29
    c.train.steps = 60
    return c
