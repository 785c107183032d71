"""Prompts in, scored completions out: the host side of GRPO and rejection sampling.

- `load_prompts`: rows of any data source (`posttrain_jax.data.sources`:
  JSONL, JSON arrays, Parquet, datasets) with a `prompt` (a string, or a list
  of messages ending with a user turn), or `messages` / ShareGPT
  `conversations` whose final assistant turn is dropped
  (kept as `row["reference"]`); every other field travels with the row to the
  reward functions (e.g. the ground truth `answer`). Prompts are rendered with
  the chat template plus the generation prompt; too-long prompts are dropped
  and counted (or fail, with `length_policy="error"`), bad rows name file:line.
- `PromptIterator`: a seeded shuffle per epoch, a fixed number of prompts per
  step, each process taking its own contiguous share, with a small state for
  checkpoints.
- `sample_and_score`: sample n completions per prompt with the jitted sampler,
  decode, score with `Rewards`, and return everything host-local.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from posttrain_jax.data.sources import normalize_sharegpt, read_rows
from posttrain_jax.rewards import RewardOutput, Rewards
from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.tokenizer import Tokenizer, end_of_turn_token, render_chat

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PromptRow:
    ids: tuple[int, ...]  # the rendered prompt, generation prompt included
    messages: tuple[dict, ...]  # the prompt as messages
    row: dict  # the source row (ground truth and any other fields for the rewards)
    source: str  # file:line


@dataclasses.dataclass
class PromptStats:
    rows: int = 0
    kept: int = 0
    too_long: int = 0
    bad: int = 0

    def report(self, path: str) -> str:
        return (f"{path}: {self.rows} rows, {self.kept} prompts kept, {self.too_long} dropped as longer than "
                f"max_prompt_length, {self.bad} bad rows skipped")


def _prompt_messages(row: dict, where: str) -> tuple[list[dict], dict]:
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}], row
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            return list(prompt), row
        raise ValueError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    if "messages" in row or "conversations" in row:
        messages = row["messages"] if "messages" in row else normalize_sharegpt(row["conversations"])
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of messages")
        if messages[-1].get("role") == "assistant":  # an SFT row: the reply is the reference answer
            return list(messages[:-1]), {**row, "reference": messages[-1].get("content", "")}
        return list(messages), row
    raise ValueError(f"{where}: a prompt row needs 'prompt' or 'messages'; it has {sorted(row)}")


def load_prompts(path: str, tokenizer: Tokenizer, *, template: str, max_prompt_length: int,
                 length_policy: str = "drop", on_bad_row: str = "error") -> tuple[list[PromptRow], PromptStats]:
    """Read and render a prompt source (see the module docstring)."""
    if length_policy not in ("drop", "error"):
        raise ValueError(f"length_policy must be 'drop' or 'error', got {length_policy!r}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    stats, out = PromptStats(), []
    for raw in read_rows(path):
        stats.rows += 1
        where = raw.location
        try:
            if raw.parse_error is not None:
                raise ValueError(f"{where}: {raw.parse_error}")
            row = raw.record
            if not isinstance(row, dict):
                raise ValueError(f"{where}: a row must be a JSON object")
            messages, row = _prompt_messages(row, where)
            ids = render_chat(tokenizer, messages, template=template, add_generation_prompt=True).ids
        except (ValueError, KeyError, TypeError) as e:
            if on_bad_row == "error":
                msg = str(e) if str(e).startswith(path) else f"{where}: {e}"
                raise ValueError(msg + " (set on_bad_row='skip' to skip and count bad rows)") from None
            stats.bad += 1
            continue
        if len(ids) > max_prompt_length:
            if length_policy == "error":
                raise ValueError(f"{where}: the prompt has {len(ids)} tokens, more than max_prompt_length="
                                 f"{max_prompt_length}")
            stats.too_long += 1
            continue
        out.append(PromptRow(tuple(ids), tuple(messages), row, where))
    stats.kept = len(out)
    if not out:
        raise ValueError(f"{path}: no usable prompts ({stats.report(path)})")
    return out, stats


class PromptIterator:
    """`prompts_per_step` global prompts per step; this process's share of each, as PromptRows."""

    def __init__(self, prompts: Sequence[PromptRow], prompts_per_step: int, *, seed: int, epochs: float = 1.0,
                 process_index: int | None = None, process_count: int | None = None):
        self.prompts, self.per_step, self.seed = list(prompts), prompts_per_step, seed
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if prompts_per_step % self.process_count:
            raise ValueError(f"prompts_per_step={prompts_per_step} must be divisible by the "
                             f"{self.process_count} processes")
        if prompts_per_step > len(self.prompts):
            raise ValueError(f"prompts_per_step={prompts_per_step} but the data has only {len(self.prompts)} prompts")
        self.steps_per_epoch = len(self.prompts) // prompts_per_step
        self.num_batches = max(1, int(epochs * self.steps_per_epoch))
        self.step = 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def __iter__(self):
        return self

    def __next__(self) -> list[PromptRow]:
        if self.step >= self.num_batches:
            raise StopIteration
        epoch, index = divmod(self.step, self.steps_per_epoch)
        chosen = self._order(epoch)[index * self.per_step:(index + 1) * self.per_step]
        share = self.per_step // self.process_count
        local = chosen[self.process_index * share:(self.process_index + 1) * share]
        self.step += 1
        return [self.prompts[i] for i in local]


def stop_tokens_for(tokenizer: Tokenizer, template: str, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """The chat template's end-of-turn token (if the tokenizer has it), the EOS, and configured ids."""
    ids, end_of_turn = [], end_of_turn_token(template, tokenizer)
    for token in (end_of_turn, tokenizer.eos_token):
        if token is not None:
            try:
                ids.append(tokenizer.token_to_id(token))
            except KeyError:
                pass
    ids += [int(t) for t in extra]
    if not ids:
        raise ValueError(f"no stop token: the tokenizer has neither {end_of_turn!r} nor an EOS; "
                         f"configure sampling.stop_tokens")
    return tuple(dict.fromkeys(ids))


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


def pad_prompts(prompts: Sequence[PromptRow], width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(prompts), width), pad, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p.ids):], mask[i, width - len(p.ids):] = p.ids, 1
    return tokens, mask


def _local_rows(x: jax.Array, mesh, sampler: Sampler) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(x)
    spec = sampler._sharding(("batch",) + (None,) * (x.ndim - 1)).spec
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))


def completion_text(tokenizer: Tokenizer, tokens: np.ndarray, length: int, stopped: bool) -> str:
    """The completion as text, without its stop token."""
    ids = tokens[:length - 1] if stopped else tokens[:length]
    return tokenizer.decode([int(t) for t in ids])


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
