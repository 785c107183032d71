"""Rewards for GRPO and rejection sampling: verifiable (math answers, exact match, format) and model-based.

One calling convention for every reward function::

    fn(completions: list[str], *, prompts: list, rows: list[dict]) -> list[float]

(``rows[i]`` is sample i's dataset row, holding e.g. its ground truth), and
one composition, `Rewards`, which returns the weighted total and each
function's raw scores and accuracy. `build_rewards` makes one from config::

    rewards = build_rewards([{"name": "math", "extract": "last_number"},
                             {"name": "format", "weight": 0.5}])
    out = rewards(completions, prompts=prompts, rows=rows)
    out.total, out.metrics()  # {"rewards/math/accuracy": ..., ...}

Modules: `math_answer` (answer extraction and equivalence), `verifiable`
(rule-based factories), `model` (a scalar-head reward model), `compose`
(calling convention, `Rewards`, `RewardError`), `config` (`build_rewards`).
"""

from posttrain_jax.rewards.compose import (PerSampleReward, RewardError, RewardOutput, Rewards, RewardTerm,
                                           SampleError)
from posttrain_jax.rewards.config import REWARD_FACTORIES, build_rewards, reward_term_from_spec
from posttrain_jax.rewards.math_answer import (EXTRACT_MODES, answers_match, clean_answer, extract_answer,
                                               ground_truth_answer, normalize_answer, parse_number)
from posttrain_jax.rewards.model import ModelReward, reward_model_from_checkpoint, reward_model_reward
from posttrain_jax.rewards.verifiable import R1_FORMAT, exact_match_reward, format_reward, math_reward

__all__ = [
    "EXTRACT_MODES", "R1_FORMAT", "REWARD_FACTORIES", "ModelReward", "PerSampleReward", "RewardError",
    "RewardOutput", "RewardTerm", "Rewards", "SampleError", "answers_match", "build_rewards", "clean_answer",
    "exact_match_reward", "extract_answer", "format_reward", "ground_truth_answer", "math_reward",
    "normalize_answer", "parse_number", "reward_model_from_checkpoint", "reward_model_reward",
    "reward_term_from_spec",
]  # fmt: skip
