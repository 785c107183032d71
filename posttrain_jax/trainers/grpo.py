"""`posttrain-jax grpo`: GRPO with verifiable and model-based rewards, sampled on-policy by the jitted sampler.

The `grpo` config section of this command (and its recipes in configs/grpo/) maps onto the RL
loop of `posttrain_jax.rl` with the group advantage and the token-level clipped ratio:
per step `prompts_per_step` prompts -> `group_size` completions each -> rewards -> group
advantages -> `num_iterations` passes over `num_minibatches` minibatches, each one jitted train
step, with an optional KL penalty (k1/k2/k3) to a frozen reference in the loss (beta 0 keeps no
reference). With one pass and one minibatch the ratio is exactly 1 (old log-probs =
stop_gradient of the current ones, as TRL does). Checkpoints are the policy's train state, as
before. `posttrain-jax rl` reaches the other algorithms.

The quickstart (no config) starts from the SFT quickstart model and rewards correct answers to
new synthetic arithmetic problems; it prints held-out accuracy before and after, greedy and
sampled at the training temperature.
"""

from __future__ import annotations

import os

import ml_collections

from posttrain_jax.losses.grpo import AGGREGATIONS
from posttrain_jax.rl import loop
from posttrain_jax.rl.settings import resolve, rl_config
from posttrain_jax.train import optimizer_config
from posttrain_jax.trainers import runner
from posttrain_jax.trainers.common import base_config
from posttrain_jax.trainers.preference import QUICKSTART_SFT_DIR
from posttrain_jax.trainers.rl import data_config, sampling_config


def default_config() -> ml_collections.ConfigDict:
    """The GRPO quickstart: the SFT quickstart model, arithmetic with a verifiable reward, CPU minutes."""
    c = base_config("runs/grpo-quickstart")
    c.model.checkpoint = os.path.join(QUICKSTART_SFT_DIR, "checkpoints")  # run `posttrain-jax sft` first
    c.tokenizer = os.path.join(QUICKSTART_SFT_DIR, "data", "tokenizer.model")
    c.data = data_config()
    # Each entry: {"name": math | exact_match | format | reward_model, "weight": w, ...its options}.
    c.rewards = [{"name": "math", "extract": "last_number", "correct": 1.0, "incorrect": 0.0}]
    # temperature 1.5: the SFT model is so sure of itself (0.05 nats/token) that at 1.0 most groups score
    # alike and give no signal; hotter samples explore, and GRPO sharpens the policy back.
    c.sampling = sampling_config()
    c.grpo = ml_collections.ConfigDict(dict(
        prompts_per_step=16, group_size=8,
        advantage_scale="group",  # group: (r - mean) / (std + eps); batch: std of the whole batch; none: Dr. GRPO
        std_ddof=1, advantage_eps=1e-4, filter_zero_std=False,
        epsilon_low=0.2, epsilon_high=0.2,  # DAPO clip-higher: epsilon_high 0.28
        beta=0.0, kl_estimator="k3",  # beta 0: no reference model is kept
        loss_aggregation="token_mean",  # token_mean (DAPO) | sequence_mean (GRPO) | constant (Dr. GRPO)
        num_iterations=1, num_minibatches=1, loss_chunk_size=0,
    ))
    c.train = runner.loop_config(steps=100, log_every=5, eval_every=0, checkpoint_every=0)
    # RL gradients are mostly noise around a small signal: lr 1e-4 (3e-4 lowered accuracy in our runs).
    c.optim = optimizer_config(learning_rate=1e-4, warmup_ratio=0.0, schedule="constant",
                                      weight_decay=0.0, b2=0.99)
    return c


def _check(config) -> None:
    g = config.grpo
    if g.loss_aggregation not in AGGREGATIONS:
        raise ValueError(f"grpo.loss_aggregation={g.loss_aggregation!r}; choose one of {AGGREGATIONS}")
    if g.group_size < 2:
        raise ValueError(f"grpo.group_size={g.group_size}: group advantages need at least 2 completions per prompt")
    if g.num_iterations < 1 or g.num_minibatches < 1:
        raise ValueError("grpo.num_iterations and grpo.num_minibatches must be >= 1")
    if not config.data.path and not config.data.quickstart_task:
        raise ValueError("config.data.path is empty: give a JSONL file of prompts (or set data.quickstart_task)")


def settings(g: ml_collections.ConfigDict):
    """The `grpo` section as RL settings: group advantages, token ratio, the KL (if any) in the loss."""
    return resolve(rl_config(
        algorithm="grpo", prompts_per_step=g.prompts_per_step, group_size=g.group_size, advantage="group",
        policy_loss="token", loss_aggregation=g.loss_aggregation, epsilon_low=g.epsilon_low,
        epsilon_high=g.epsilon_high, kl_coef=g.beta, kl_estimator=g.kl_estimator, kl_in="loss",
        advantage_scale=g.advantage_scale, std_ddof=g.std_ddof, advantage_eps=g.advantage_eps,
        filter_zero_std=g.filter_zero_std, num_epochs=g.num_iterations, num_minibatches=g.num_minibatches,
        loss_chunk_size=g.loss_chunk_size))


def main(config: ml_collections.ConfigDict, *, resume: bool = False) -> dict:
    """Train with GRPO (continuing from the latest checkpoint with `resume`); returns a summary."""
    _check(config)
    return loop.run(config, settings(config.grpo), resume=resume)
