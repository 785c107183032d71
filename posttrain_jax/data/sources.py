"""Reading SFT rows from local JSONL and Parquet files.

Two row formats are understood (extra fields are ignored):

- chat: ``{"messages": [{"role": ..., "content": ...}, ...]}``, an optional
  system message then alternating user/assistant turns;
- prompt/completion: ``{"prompt": ..., "completion": ...}``, where the prompt
  is a string (one user turn) or a list of messages, and the completion a
  string (one assistant turn) or a list of messages. Only the completion is
  trained on (as TRL does for this format), even if the prompt holds earlier
  assistant turns.

Every row carries its location (``file:line`` for JSONL, 1-based;
``file: row i`` for Parquet, 0-based like pyarrow and pandas), so a bad row
gets an error message that names it.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from posttrain_jax.tokenizer import validate_messages

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
PARQUET_SUFFIXES = (".parquet",)


class DataError(ValueError):
    """A malformed data file or row; the message names the file and line/row."""


@dataclass(frozen=True)
class RawRow:
    """One row as read: its location, and the parsed record or why parsing failed."""

    location: str
    record: object = None
    parse_error: str | None = None


@dataclass(frozen=True)
class Conversation:
    """A validated row: the messages to render, and how many of them are prompt.

    `num_prompt_messages` is None for chat rows (train on every assistant
    turn) and the prompt's message count for prompt/completion rows (train
    only on what follows it).
    """

    messages: list[dict]
    num_prompt_messages: int | None = None


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix


def expand_paths(path: str | Path) -> list[Path]:
    """The data files of a source: a file, a directory (its .jsonl/.parquet
    files) or a glob pattern (``data/train-*.parquet``), sorted."""
    text = str(path)
    supported = JSONL_SUFFIXES + PARQUET_SUFFIXES
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"no data files match the pattern {text}")
    elif Path(text).is_dir():
        files = sorted(p for p in Path(text).rglob("*") if p.is_file() and _suffix(p) in supported)
        if not files:
            raise FileNotFoundError(f"data directory {text} has no {', '.join(supported)} files")
    elif Path(text).is_file():
        files = [Path(text)]
    else:
        raise FileNotFoundError(f"data file not found: {text}")
    for file in files:
        if _suffix(file) not in supported:
            raise DataError(f"{file}: unsupported data file type; expected one of {', '.join(supported)}")
    return files


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    # Bytes, decoded per line, so a bad encoding is one bad row with a line
    # number rather than a crash somewhere in the file.
    with opener(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            location = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(location, parse_error=f"not UTF-8: {e}")
                continue
            # Blank lines (e.g. a trailing newline) hold no row, so they are
            # not rows to count as bad.
            if not line.strip():
                continue
            if line_number == 1 and line.lstrip().startswith("[") and path.suffix.lower() == ".json":
                raise DataError(f"{path} looks like one JSON array; write one JSON object per line (JSON Lines)")
            try:
                yield RawRow(location, json.loads(line))
            except json.JSONDecodeError as e:
                yield RawRow(location, parse_error=f"invalid JSON: {e}")


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet_file = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read as Parquet: {e}") from e
    row_index = 0
    # Batches keep memory bounded for large shards.
    for batch in parquet_file.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield RawRow(f"{path}: row {row_index}", record)
            row_index += 1


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield every row of every file of a source (see `expand_paths`)."""
    for file in expand_paths(path):
        if _suffix(file) in PARQUET_SUFFIXES:
            yield from _read_parquet(file)
        else:
            yield from _read_jsonl(file)


def _as_messages(value: object, field: str, default_role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list):
        return list(value)
    raise ValueError(f"field {field!r} must be a string or a list of messages, got {type(value).__name__}")


def to_conversation(record: object) -> Conversation:
    """Validate one parsed row and turn it into a `Conversation`.

    Raises ValueError describing the problem (missing field, non-string
    content, wrong role order, ...); the caller adds the row's location.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"expected an object with 'messages' or 'prompt'/'completion', got {type(record).__name__}")
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise ValueError("row has both 'messages' and 'prompt'/'completion'; use one format")
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ValueError(f"field 'messages' must be a list of messages, got {type(messages).__name__}")
        messages = [dict(m) if isinstance(m, Mapping) else m for m in messages]
        validate_messages(messages)
        return Conversation(messages)
    if "prompt" in record and "completion" in record:
        prompt = _as_messages(record["prompt"], "prompt", "user")
        completion = _as_messages(record["completion"], "completion", "assistant")
        messages = [dict(m) if isinstance(m, Mapping) else m for m in prompt + completion]
        validate_messages(messages)
        if not prompt or not completion:
            raise ValueError("'prompt' and 'completion' must each hold at least one message")
        return Conversation(messages, num_prompt_messages=len(prompt))
    keys = ", ".join(repr(k) for k in record) or "none"
    raise ValueError(f"missing field: expected 'messages', or 'prompt' and 'completion' (row has keys: {keys})")
