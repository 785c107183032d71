"""Held-out evaluation of an RL policy and the synthetic quickstart task (shared by `rl` and `grpo`)."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from posttrain_jax.data import synthetic
from posttrain_jax.eval.evaluator import EvalSettings, Evaluator
from posttrain_jax.sampling import Sampler
from posttrain_jax.data.prompts import load_prompts
from posttrain_jax.sampling.text import stop_tokens_for


def global_rows(values: np.ndarray) -> np.ndarray:
    """Concatenate every process's rows (the same order as the global batch)."""
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.process_allgather(values, tiled=True))


def quickstart_data(config) -> None:
    """Write arithmetic prompts with answers to <output_dir>/data and point data.path / eval_path at them."""
    d = config.data
    directory = os.path.join(config.output_dir, "data")
    d.path, d.eval_path = os.path.join(directory, "prompts.jsonl"), os.path.join(directory, "eval_prompts.jsonl")
    if jax.process_index() == 0 and not os.path.exists(d.eval_path):
        os.makedirs(directory, exist_ok=True)
        # A seed of its own: none of these problems is the SFT quickstart's (seeds 0/1).
        for path, n, seed in ((d.path, d.quickstart_num_train, 7), (d.eval_path, d.quickstart_num_eval, 8)):
            problems = synthetic.generate_problems(n, seed=seed, max_operand=d.quickstart_max_operand)
            with open(path, "w") as f:
                f.writelines(json.dumps({"prompt": p.question, "answer": str(p.answer)}) + "\n" for p in problems)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("rl quickstart data")


def make_evaluate(config, sampler: Sampler, tokenizer, rewards, pad: int):
    """evaluate(params) -> held-out metrics of the verifiable rewards, through `posttrain_jax.eval.Evaluator`
    (the evaluator of `posttrain-jax eval` and every trainer's before/after evaluation).

    Keys: `accuracy` (greedy), `reward_mean` (mean total reward of the greedy replies) and, with
    data.eval_samples > 0, `sampled_accuracy` (pass@1 of eval_samples samples at the training temperature:
    the policy the RL objective optimises) and `sampled_reward_mean`; plus the evaluator's own keys
    (per-reward means, lengths, truncation rates). Raises ValueError as `Evaluator` does (e.g. data.eval_batch
    not a multiple of processes x data shards).
    """
    d, s = config.data, config.sampling
    prompts, stats = load_prompts(d.eval_path, tokenizer, template=config.chat_template,
                                  max_prompt_length=d.max_prompt_length, length_policy=d.length_policy,
                                  on_bad_row=d.on_bad_row)
    logging.getLogger(__name__).info(stats.report(d.eval_path))
    settings = EvalSettings(num_samples=d.eval_samples, ks=(1,) if d.eval_samples else (), greedy=True,
                            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                            max_new_tokens=s.max_new_tokens, prompts_per_batch=d.eval_batch,
                            max_prompt_length=d.max_prompt_length, seed=config.seed)
    evaluator = Evaluator(prompts, sampler=sampler, tokenizer=tokenizer, rewards=rewards, settings=settings,
                          stop_tokens=stop_tokens_for(tokenizer, config.chat_template, s.stop_tokens),
                          pad_token=pad)
    names = {"greedy_reward": "reward_mean", "pass@1": "sampled_accuracy", "sampled_reward": "sampled_reward_mean"}

    def evaluate(params) -> dict[str, float]:
        metrics = evaluator(params, desc="eval", leave=False)  # one bar per eval_every, not a trail
        return {names.get(k, k): float(v) for k, v in metrics.items()}

    return evaluate
