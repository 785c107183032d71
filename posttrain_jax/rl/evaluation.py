"""Held-out evaluation of an RL policy and the synthetic quickstart task (shared by `rl` and `grpo`)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from posttrain_jax.data import synthetic
from posttrain_jax.metrics import progress_bar
from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.trainers.rollout import load_prompts, sample_and_score, stop_tokens_for


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
    """Held-out accuracy of the verifiable rewards: greedy, and pass@1 of `eval_samples` samples drawn at the
    training temperature (the policy GRPO optimises), plus the mean total reward of those samples."""
    d, s = config.data, config.sampling
    prompts, _ = load_prompts(d.eval_path, tokenizer, template=config.chat_template,
                              max_prompt_length=d.max_prompt_length, length_policy=d.length_policy,
                              on_bad_row=d.on_bad_row)
    stops = stop_tokens_for(tokenizer, config.chat_template, s.stop_tokens)
    modes = {"accuracy": SamplingParams(max_new_tokens=s.max_new_tokens, greedy=True, pad_token=pad,
                                        stop_tokens=stops)}
    if d.eval_samples:
        modes["sampled_accuracy"] = SamplingParams(
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
            stop_tokens=stops, pad_token=pad, num_samples=d.eval_samples)
    batch, count = d.eval_batch, jax.process_count()
    if batch % count:
        raise ValueError(f"data.eval_batch={batch} must be divisible by the {count} processes")
    verifiable = list(rewards.verifiable)[:1]

    def evaluate(params) -> dict[str, float]:
        sums = np.zeros(2 * len(modes))  # per mode: correct, reward
        share = batch // count
        first = jax.process_index() * share
        # (the sampler sets its mesh itself; a reward model runs on its own)
        bar = progress_bar(len(prompts), desc="eval", unit="prompt", leave=False)
        for begin in range(0, len(prompts), batch):
            chunk = prompts[begin:begin + batch]
            real = len(chunk)
            chunk = chunk + [prompts[0]] * (batch - real)  # a fixed shape: one compilation per mode
            local = chunk[first:first + share]
            for i, (name, params_) in enumerate(modes.items()):
                out = sample_and_score(sampler, params, local, params_, jax.random.key(begin),
                                       tokenizer=tokenizer, rewards=rewards,
                                       max_prompt_length=d.max_prompt_length)
                n = params_.num_samples
                valid = np.repeat(np.arange(first, first + share) < real, n).astype(np.float64) / n
                if verifiable:
                    sums[2 * i] += float((out.rewards.correct[verifiable[0]] * valid).sum())
                sums[2 * i + 1] += float((out.rewards.total * valid).sum())
            bar.update(real)
        bar.close()
        sums = global_rows(sums[None]).sum(axis=0) / len(prompts)
        result = {"prompts": float(len(prompts))}
        for i, name in enumerate(modes):
            if verifiable:
                result[name] = float(sums[2 * i])
            result["reward_mean" if name == "accuracy" else "sampled_reward_mean"] = float(sums[2 * i + 1])
        return result

    return evaluate
