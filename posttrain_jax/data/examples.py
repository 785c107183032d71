"""The tokenization pre-pass: rows -> token ids and loss masks, with counts.

Each source is read and tokenized once, before training, so bad rows fail
fast (or are counted), and the counts and lengths the mixer and packer plan
with are exact. Examples of a source are stored flat (one ``int32`` id array,
one ``bool`` array, offsets), which costs a few bytes per token instead of a
Python object per example.

`trained[t]` says whether token ``t`` is a loss target: the pipeline shifts
an example ``x[0..n)`` into tokens ``x[0..n-1)``, targets ``x[1..n)`` and
loss mask ``trained[1..n)``.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from posttrain_jax.data.sources import Conversation, DataError, bad_row_reason, count_rows, read_rows, to_conversation
from posttrain_jax.data.stats import SourceStats
from posttrain_jax.metrics import progress_bar
from posttrain_jax.tokenizer import Tokenizer, render_chat

TRAIN_ON = ("assistant", "all")
LENGTH_POLICIES = ("truncate", "drop")
BAD_ROW_POLICIES = ("error", "skip")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError listing the valid values unless `value` is one of them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {', '.join(map(repr, choices))}")


@dataclass
class TokenizedSource:
    """The kept examples of one source, stored flat, plus its counts."""

    stats: SourceStats
    ids: np.ndarray  # int32 [total_tokens]
    trained: np.ndarray  # bool [total_tokens]
    offsets: np.ndarray  # int64 [num_examples + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Token count of each example (before the shift)."""
        return np.diff(self.offsets)

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, trained) of one example; views into the flat arrays."""
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.ids[start:end], self.trained[start:end]


def check_template(tokenizer: Tokenizer, template: str) -> None:
    """Fail before reading any data if `tokenizer` cannot render `template`
    (unknown template, missing chat special tokens, no bos when needed)."""
    render_chat(tokenizer, [{"role": "user", "content": "hi"}], template=template)


def encode_conversation(tokenizer: Tokenizer, conversation: Conversation, *, template: str,
                        train_on: str = "assistant") -> tuple[list[int], list[bool]]:  # fmt: skip
    """Token ids and per-token "is a loss target" flags of one conversation.

    train_on="assistant" trains on assistant content and end-of-turn tokens
    (`render_chat`'s mask); for a prompt/completion row, only on the
    completion. train_on="all" trains on every token.
    """
    encoding = render_chat(tokenizer, conversation.messages, template=template)
    ids = encoding.ids
    if train_on == "all":
        return ids, [True] * len(ids)
    trained = list(encoding.assistant_mask)
    if conversation.num_prompt_messages is not None:
        prompt = render_chat(tokenizer, conversation.messages[: conversation.num_prompt_messages],
                             template=template, add_generation_prompt=True)  # fmt: skip
        # The prompt's tokens are the common prefix of both renderings; compare
        # ids rather than trusting lengths, in case the tokenizer merges
        # across the prompt/completion boundary.
        common = 0
        for a, b in zip(prompt.ids, ids):
            if a != b:
                break
            common += 1
        trained[:common] = [False] * common
    return ids, trained


def tokenize_source(path: str | Path, tokenizer: Tokenizer, *, template: str, seq_len: int,
                    train_on: str = "assistant", length_policy: str = "truncate", on_bad_row: str = "error",
                    name: str | None = None, normalize: bool = False) -> TokenizedSource:  # fmt: skip
    """Read and tokenize every row of a source (file, directory or glob).

    Examples longer than ``seq_len + 1`` tokens (``seq_len`` once shifted) are
    cut to their first ``seq_len + 1`` tokens (length_policy="truncate") or
    dropped ("drop"). Examples with no loss token left are dropped. A
    malformed row raises `DataError` naming its file and line (Parquet: row),
    or with on_bad_row="skip" is counted (per reason) and its message kept
    for the report. `normalize`: ShareGPT role aliases and merged turns (see
    `posttrain_jax.data.sources`). A progress bar shows rows, rate and ETA.
    """
    check_choice("train_on", train_on, TRAIN_ON)
    check_choice("length_policy", length_policy, LENGTH_POLICIES)
    check_choice("on_bad_row", on_bad_row, BAD_ROW_POLICIES)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    stats = SourceStats(name=name or str(path))
    max_ids = seq_len + 1
    ids_out, trained_out, offsets = array("i"), bytearray(), array("q", [0])
    bar = progress_bar(count_rows(path), desc=f"tokenizing {stats.name}", unit="row")
    for row in read_rows(path):
        bar.update()
        stats.rows += 1
        try:
            if row.parse_error is not None:
                raise ValueError(row.parse_error)
            conversation = to_conversation(row.record, normalize=normalize)
            ids, trained = encode_conversation(tokenizer, conversation, template=template, train_on=train_on)
        except ValueError as e:
            message = f"{row.location}: {e}"
            if on_bad_row == "error":
                raise DataError(message + ' (pass on_bad_row="skip" to skip and count bad rows)') from e
            stats.add_bad_row(message, bad_row_reason(e))
            continue
        truncated = len(ids) > max_ids
        if truncated:
            if length_policy == "drop":
                stats.dropped_too_long += 1
                continue
            ids, trained = ids[:max_ids], trained[:max_ids]
        # trained[0] never counts: the first token is never a target.
        num_loss_tokens = sum(trained[1:])
        if num_loss_tokens == 0:
            stats.dropped_no_loss_tokens += 1
            continue
        stats.examples += 1
        stats.truncated += truncated
        stats.tokens += len(ids) - 1
        stats.loss_tokens += num_loss_tokens
        ids_out.extend(ids)
        trained_out.extend(trained)
        offsets.append(len(ids_out))
    bar.close()
    return TokenizedSource(
        stats=stats,
        ids=np.frombuffer(ids_out, dtype=np.int32).copy() if ids_out else np.zeros(0, np.int32),
        trained=np.frombuffer(bytes(trained_out), dtype=np.bool_).copy(),
        offsets=np.frombuffer(offsets, dtype=np.int64).copy(),
    )
