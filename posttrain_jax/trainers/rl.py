"""`posttrain-jax rl --config.rl.algorithm=ppo|grpo|rloo|reinforce_pp|gspo`: on-policy RL from pieces.

The pieces live in `posttrain_jax.rl` (rollout, advantages, KL, policy / value losses, the loop);
this module is the config. The quickstart (no config) is GRPO on the synthetic arithmetic task
from the SFT quickstart model (`posttrain-jax sft` first); `configs/rl/*.py` hold one quickstart
per algorithm and `configs/tulu3/rlvr_8b.py` Tülu 3's PPO.
"""

from __future__ import annotations

import os

import ml_collections

from posttrain_jax.rl import loop
from posttrain_jax.rl.settings import critic_config, resolve, rl_config
from posttrain_jax.train import optimizer_config
from posttrain_jax.trainers import runner
from posttrain_jax.trainers.common import base_config
from posttrain_jax.trainers.preference import QUICKSTART_SFT_DIR


def data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        quickstart_task=True,  # write arithmetic prompts with their answers to <output_dir>/data and use them
        quickstart_num_train=4000, quickstart_num_eval=200, quickstart_max_operand=19,
        path="",  # JSONL: {"prompt": str | messages, <ground truth fields>} or {"messages": [..., assistant]}
        eval_path="",  # the same format; held-out greedy accuracy of the verifiable rewards
        epochs=1.0, max_prompt_length=64, length_policy="drop", on_bad_row="error",
        eval_batch=64, eval_samples=8,  # eval: greedy accuracy, and pass@1 over eval_samples (0: greedy only)
    ))


def sampling_config(**overrides) -> ml_collections.ConfigDict:
    # temperature 1.5: the SFT quickstart model is so sure of itself that at 1.0 most groups score alike.
    base = dict(max_new_tokens=16, temperature=1.5, top_k=0, top_p=1.0, stop_tokens=[])
    return ml_collections.ConfigDict({**base, **overrides})


def default_config() -> ml_collections.ConfigDict:
    c = base_config("runs/rl-quickstart")
    c.model.checkpoint = os.path.join(QUICKSTART_SFT_DIR, "checkpoints")  # run `posttrain-jax sft` first
    c.tokenizer = os.path.join(QUICKSTART_SFT_DIR, "data", "tokenizer.model")
    c.data = data_config()
    # Each entry: {"name": math | exact_match | format | reward_model, "weight": w, ...its options}.
    c.rewards = [{"name": "math", "extract": "last_number", "correct": 1.0, "incorrect": 0.0}]
    c.sampling = sampling_config()
    c.rl = rl_config()
    c.critic = critic_config()  # used by algorithm=ppo (advantage=gae)
    c.train = runner.loop_config(steps=100, log_every=5, eval_every=0, checkpoint_every=0)
    c.optim = optimizer_config(learning_rate=1e-4, warmup_ratio=0.0, schedule="constant",
                                      weight_decay=0.0, b2=0.99)
    return c


def main(config: ml_collections.ConfigDict, *, resume: bool = False) -> dict:
    """Train with the algorithm of `config.rl` (continuing from the latest checkpoint with `resume`)."""
    return loop.run(config, resolve(config.rl), resume=resume)
