"""Qwen 2.5's RL curriculum: prompts ordered by the variance of their reward under the current policy.

Qwen 2.5 (technical report, section 4.2) keeps for RL the queries whose sampled responses the
reward model scores most differently, high variance first: those are the prompts with signal
for a group-relative update. Here the prompt stream is cut into pools of `pool_steps` steps;
at the start of each pool every prompt of the pool is sampled `group_size` times with the
current parameters and scored, and the pool is replayed in decreasing reward variance. Each
process orders its own share (no cross-process traffic).

A checkpoint taken mid-pool stores the pool's start, so a resumed run re-scores that pool with
the restored parameters and replays all of it (the order may differ; the prompts are the same).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class CurriculumIterator:
    """Wraps a `PromptIterator`: the same prompts per pool of `pool_steps` steps, high reward variance first."""

    def __init__(self, prompts, pool_steps: int, *, score: Callable[[list], np.ndarray]):
        if pool_steps < 1:
            raise ValueError(f"rl.curriculum_pool_steps={pool_steps} must be >= 1")
        self.prompts, self.pool_steps, self.score = prompts, pool_steps, score
        self.pool: list[list] = []
        self.pool_start = prompts.get_state()["step"]

    def __iter__(self):
        return self

    def __next__(self) -> list:
        if not self.pool:
            self.pool_start = self.prompts.get_state()["step"]
            batches = []
            for _ in range(self.pool_steps):
                try:
                    batches.append(next(self.prompts))
                except StopIteration:
                    break
            if not batches:
                raise StopIteration
            per_step = len(batches[0])
            rows = [row for batch in batches for row in batch]
            variance = np.asarray(self.score(rows), np.float64)
            order = np.argsort(-variance, kind="stable")
            ranked = [rows[i] for i in order]
            self.pool = [ranked[i:i + per_step] for i in range(0, len(ranked), per_step)]
        return self.pool.pop(0)

    def get_state(self) -> dict:
        # Mid-pool: come back to the pool's start (its order depends on the parameters of then).
        return {"step": self.pool_start if self.pool else self.prompts.get_state()["step"]}

    def set_state(self, state: dict) -> None:
        self.prompts.set_state(state)
        self.pool, self.pool_start = [], int(state["step"])
