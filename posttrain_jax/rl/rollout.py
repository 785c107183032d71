"""Rollouts for the RL loop: sample + score (`trainers.rollout.sample_and_score`), a host batch, staleness.

`rollout_batch` lays a rollout out for the training forward (`trainers.rollout.training_batch`)
and adds what the scoring pass needs: the sampler's log-probs at the loss positions as the
behaviour policy, the summed reward per completion (minus a penalty for completions that never
stopped, if configured) and a sample mask.

`RolloutQueue` decouples producing a rollout from consuming it: with `max_staleness = k` it keeps
k rollouts produced ahead, so the rollout trained on at step t was sampled with the parameters
of step t - 1 - k (on one mesh: sampled before the update and consumed after it). The producer
is a callable `produce(step, params) -> rollout`; a separate rollout mesh would make `produce`
hand the work to other devices and return a future, with no change to the loop.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np

from posttrain_jax.trainers.rollout import Rollout, training_batch


def rollout_batch(rollout: Rollout, pad: int, *, missing_eos_penalty: float = 0.0) -> dict[str, np.ndarray]:
    """Host arrays of this process's rows: the training layout + behaviour_logps, scores, sample_mask.

    behaviour_logps [rows, width] float32 hold the sampler's log-prob of targets[p] at each loss
    position p (0 elsewhere); scores [rows] float32 = total reward - missing_eos_penalty for rows
    that hit max_new_tokens without a stop token (TRL's `missing_eos_penalty`, Tülu 3's -10).
    """
    host = training_batch(rollout, pad)
    rows, new = rollout.tokens.shape
    start = rollout.prompt_ids.shape[1] - 1  # the position whose target is the first completion token
    behaviour = np.zeros(host["tokens"].shape, np.float32)
    completion = np.arange(new)[None, :] < rollout.lengths[:, None]
    behaviour[:, start:start + new] = np.where(completion, rollout.logprobs, 0.0)
    scores = rollout.rewards.total.astype(np.float32)
    if missing_eos_penalty:
        scores = scores - np.float32(missing_eos_penalty) * (~rollout.stopped.astype(bool)).astype(np.float32)
    host.update(behaviour_logps=behaviour, scores=scores, sample_mask=np.ones(rows, np.float32))
    return host


class RolloutQueue:
    """Rollouts produced up to `max_staleness` steps ahead of the step that trains on them.

    `next(step, params)` tops the queue up with rollouts for steps step .. step + max_staleness
    (each produced with `params`, the current ones) and returns the one for `step`.
    `pending` is how many produced-but-unconsumed rollouts the queue holds: a checkpoint saves
    the prompt position minus `pending`, so a resumed run samples those prompts again (with the
    restored parameters: resuming an off-policy run is exact only up to that resample).
    """

    def __init__(self, produce: Callable[[int, object], object], *, max_staleness: int = 0, last_step: int):
        self.produce, self.max_staleness, self.last_step = produce, max_staleness, last_step
        self.queue: collections.deque = collections.deque()
        self.next_step: int | None = None

    @property
    def pending(self) -> int:
        return len(self.queue)

    def next(self, step: int, params):
        if self.next_step is None:
            self.next_step = step
        while self.next_step <= min(step + self.max_staleness, self.last_step):
            try:
                produced = self.produce(self.next_step, params)
            except StopIteration:  # the prompts ran out: consume what was produced, then stop
                self.last_step = self.next_step - 1
                break
            self.queue.append((self.next_step, produced))
            self.next_step += 1
        if not self.queue:
            raise StopIteration
        produced_for, rollout = self.queue.popleft()
        assert produced_for == step, (produced_for, step)
        return rollout
