"""Rollouts: prompts -> sampler -> rewards (`sample_and_score`), the training layout, staleness.

`sample_and_score` samples n completions per prompt with the jitted sampler, decodes them, scores
them with `Rewards` and returns everything host-local (also used by rejection sampling and eval).
`training_batch` lays prompt + completion rows out for a training forward; `rollout_batch` adds
what the scoring pass needs: the sampler's log-probs at the loss positions as the
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
import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from posttrain_jax.data.prompts import PromptRow
from posttrain_jax.rewards import RewardOutput, Rewards
from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.sampling.text import completion_text, pad_prompts
from posttrain_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class Rollout:
    """Host-local completions of this process's prompts (n rows per prompt, contiguous)."""

    prompt_ids: np.ndarray  # [rows, max_prompt_length] left-padded
    prompt_mask: np.ndarray  # [rows, max_prompt_length]
    tokens: np.ndarray  # [rows, max_new_tokens]
    logprobs: np.ndarray  # [rows, max_new_tokens] sampler log-probs
    lengths: np.ndarray  # [rows]
    stopped: np.ndarray  # [rows] bool
    texts: list[str]
    rewards: RewardOutput
    prompts: list[PromptRow]  # one per row


def _local_rows(x: jax.Array, mesh, sampler: Sampler) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(x)
    spec = sampler._sharding(("batch",) + (None,) * (x.ndim - 1)).spec
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))


def sample_and_score(sampler: Sampler, state, prompts: Sequence[PromptRow], params: SamplingParams, rng, *,
                     tokenizer: Tokenizer, rewards: Rewards, max_prompt_length: int) -> Rollout:
    """Sample `params.num_samples` completions for each of this process's prompts and score them."""
    tokens, mask = pad_prompts(prompts, max_prompt_length, params.pad_token)
    out = sampler.generate_padded(state, tokens, mask, params, rng)
    local = {k: _local_rows(getattr(out, k), sampler.mesh, sampler) for k in ("tokens", "logprobs", "lengths",
                                                                              "stopped")}
    n = params.num_samples
    rows = [p for p in prompts for _ in range(n)]
    texts = [completion_text(tokenizer, t, int(length), bool(s))
             for t, length, s in zip(local["tokens"], local["lengths"], local["stopped"])]
    scored = rewards(texts, prompts=[list(p.messages) for p in rows], rows=[p.row for p in rows])
    return Rollout(prompt_ids=np.repeat(tokens, n, axis=0), prompt_mask=np.repeat(mask, n, axis=0),
                   tokens=local["tokens"], logprobs=local["logprobs"], lengths=local["lengths"],
                   stopped=local["stopped"], texts=texts, rewards=scored, prompts=rows)


def training_batch(rollout: Rollout, pad: int) -> dict[str, np.ndarray]:
    """Prompt + completion rows for a training forward, in the layout the sampler decoded them.

    tokens/targets/positions/segment_ids/loss_mask [rows, prompt + new], targets shifted by one;
    the loss covers exactly the generated tokens (the stop token included).
    """
    rows, new = rollout.tokens.shape
    width = rollout.prompt_ids.shape[1] + new
    completion_mask = (np.arange(new)[None, :] < rollout.lengths[:, None]).astype(np.int32)
    seq = np.concatenate([rollout.prompt_ids, np.where(completion_mask > 0, rollout.tokens, pad)], axis=1)
    segment_ids = np.concatenate([rollout.prompt_mask, completion_mask], axis=1).astype(np.int32)
    # Left padding is moved out of the way exactly as in the sampler: positions count real tokens.
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    targets = np.concatenate([seq[:, 1:], np.full((rows, 1), pad, np.int32)], axis=1)
    loss_mask = np.concatenate([np.zeros((rows, rollout.prompt_ids.shape[1] - 1), np.int32), completion_mask,
                                np.zeros((rows, 1), np.int32)], axis=1)
    assert loss_mask.shape == (rows, width)
    return {"tokens": seq.astype(np.int32), "targets": targets.astype(np.int32), "positions": positions,
            "segment_ids": segment_ids, "loss_mask": loss_mask}


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
