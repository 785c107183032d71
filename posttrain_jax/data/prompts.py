"""Prompt data for sampling, RL, rejection sampling and evaluation.

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from posttrain_jax.data.sources import normalize_sharegpt, read_rows
from posttrain_jax.tokenizer import Tokenizer, render_chat


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
