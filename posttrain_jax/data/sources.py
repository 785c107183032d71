"""Reading rows from local files and Hugging Face datasets.

Sources: JSON Lines (``.jsonl``, ``.jsonl.gz``), a ``.json`` file holding
one JSON array of rows (or JSON Lines), Parquet, a directory or glob of
those; a Hugging Face ``datasets`` directory written by ``save_to_disk``
(one split's directory); and ``hf:NAME[:SPLIT]``, which is
``datasets.load_dataset(NAME, split=SPLIT)`` (default split "train") on a
local data directory or the local datasets cache (set
``HF_DATASETS_OFFLINE=1`` to forbid downloads).

Three row formats are understood (extra fields are ignored):

- chat: ``{"messages": [{"role": ..., "content": ...}, ...]}``, an optional
  system message then alternating user/assistant turns;
- ShareGPT: ``{"conversations": [{"from": "human" | "gpt" | "system",
  "value": ...}, ...]}``. Real dumps also carry roles such as ``chatgpt``,
  ``bing``, ``bard``, ``user``, conversations that start with the assistant
  and two user turns in a row: each is a bad row with its own reason
  (counted per reason under ``on_bad_row="skip"``). With the source option
  ``normalize`` (`normalize_sharegpt`), the assistant aliases
  (`SHAREGPT_ALIASES`) and ``user`` are mapped to their roles and
  consecutive turns of one role are merged (joined by a blank line);
  conversations that start with the assistant are still bad rows;
- prompt/completion: ``{"prompt": ..., "completion": ...}``, where the prompt
  is a string (one user turn) or a list of messages, and the completion a
  string (one assistant turn) or a list of messages. Only the completion is
  trained on (as TRL does for this format), even if the prompt holds earlier
  assistant turns.

Every row carries its location (``file:line`` for JSONL, 1-based;
``file: item i`` for a JSON array and ``file: row i`` for Parquet and
datasets, 0-based like pyarrow and pandas), so a bad row gets an error
message that names it, and a reason (`bad_row_reason`) it is counted under.
"""

from __future__ import annotations

import glob
import gzip
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from posttrain_jax.tokenizer import validate_messages

HF_PREFIX = "hf:"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# Roles in real ShareGPT dumps that `normalize` maps (to the assistant, except "user").
SHAREGPT_ALIASES = {"user": "user", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                    "assistant": "assistant", "model": "assistant"}  # fmt: skip

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
PARQUET_SUFFIXES = (".parquet",)


class DataError(ValueError):
    """A malformed data file or row; the message names the file and line/row."""


class BadRow(ValueError):
    """A row that cannot be used, with a short `reason` it is counted under."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


# Reasons of the validation errors raised without one (first match wins).
_REASONS = (("invalid JSON", "invalid JSON"), ("not UTF-8", "not UTF-8"), ("unknown role", "unknown role"),
            ("expected role", "roles out of order"), ("content must be", "non-string content"),
            ("missing field", "missing field"), ("system message is only", "system message not first"),
            ("is empty", "empty"), ("identical", "identical responses"), ("strength", "bad strength"),
            ("margin", "bad margin"), ("chat template", "rejected by the chat template"))  # fmt: skip


def bad_row_reason(error: Exception) -> str:
    """The reason a bad row is counted under in the end-of-data report."""
    if isinstance(error, BadRow):
        return error.reason
    text = str(error)
    return next((reason for needle, reason in _REASONS if needle in text), "invalid row")


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
            try:
                yield RawRow(location, json.loads(line))
            except json.JSONDecodeError as e:
                yield RawRow(location, parse_error=f"invalid JSON: {e}")


def _read_json(path: Path) -> Iterator[RawRow]:
    """A ``.json`` file: one JSON array of rows, or JSON Lines."""
    with open(path, "rb") as f:
        head = f.read(1024).lstrip()
    if not head.startswith(b"["):
        yield from _read_jsonl(path)
        return
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8: {e}") from e
    # Item by item, so a damaged item (a file cut off mid-row, as real dumps
    # are) is one bad row after all the complete ones, not a lost file.
    decoder, index = json.JSONDecoder(), 0
    pos = text.index("[") + 1
    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield RawRow(f"{path}: item {index}", parse_error=f"invalid JSON (the array cannot be read past it): {e}")
            return
        yield RawRow(f"{path}: item {index}", record)
        index += 1
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            yield RawRow(f"{path}: item {index}", parse_error=f"invalid JSON: expected ',' or ']' at char {pos}")
            return


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _read_dataset(dataset, label: str) -> Iterator[RawRow]:
    for index, record in enumerate(dataset):
        yield RawRow(f"{label}: row {index}", record)


def _load_hf(spec: str):
    """`datasets.load_dataset` for ``hf:NAME[:SPLIT]`` (a local directory or the local cache)."""
    import datasets

    name, split = spec, "train"
    if re.fullmatch(r".+:[A-Za-z0-9_.\[\]%:-]+", spec) and not Path(spec).exists():
        name, split = spec.rsplit(":", 1)
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError, ...)
        raise DataError(f"{HF_PREFIX}{spec}: datasets.load_dataset({name!r}, split={split!r}) failed: "
                        f"{type(e).__name__}: {e}") from e


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
    """Yield every row of a source: a datasets source (see the module docstring) or every
    file of a file source (see `expand_paths`)."""
    text = str(path)
    if text.startswith(HF_PREFIX):
        yield from _read_dataset(_load_hf(text[len(HF_PREFIX):]), text)
        return
    if Path(text).is_dir() and (Path(text) / "dataset_dict.json").is_file():
        splits = json.loads((Path(text) / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{text} is a DatasetDict saved with save_to_disk; give one split's directory: "
                        + ", ".join(str(Path(text) / s) for s in splits))  # fmt: skip
    if _is_saved_dataset(Path(text)):
        import datasets

        yield from _read_dataset(datasets.load_from_disk(text), text)
        return
    for file in expand_paths(path):
        if _suffix(file) in PARQUET_SUFFIXES:
            yield from _read_parquet(file)
        elif _suffix(file) == ".json":
            yield from _read_json(file)
        else:
            yield from _read_jsonl(file)


def count_rows(path: str | Path) -> int | None:
    """A cheap row count of a source for a progress bar (lines of JSON Lines, Parquet metadata,
    dataset length); None where it would cost a parse (JSON arrays) or a load (``hf:``)."""
    text = str(path)
    if text.startswith(HF_PREFIX) or (Path(text) / "dataset_dict.json").is_file():
        return None
    if _is_saved_dataset(Path(text)):
        import datasets

        return len(datasets.load_from_disk(text))  # memory-mapped: cheap
    total = 0
    for file in expand_paths(path):
        if _suffix(file) in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            total += pq.ParquetFile(file).metadata.num_rows
        elif file.name.lower().endswith(".gz"):
            return None
        else:
            with open(file, "rb") as f:
                if _suffix(file) == ".json" and f.read(1024).lstrip().startswith(b"["):
                    return None
                f.seek(0)
                total += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return total


def _as_messages(value: object, field: str, default_role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list):
        return list(value)
    raise ValueError(f"field {field!r} must be a string or a list of messages, got {type(value).__name__}")


def normalize_sharegpt(turns: object, *, normalize: bool = False) -> list[dict]:
    """ShareGPT turns (``[{"from": ..., "value": ...}]``) as chat messages.

    Raises `BadRow` (with its reason) for unknown roles, malformed turns, a
    conversation that starts with the assistant, or two turns of one role in
    a row. `normalize` maps `SHAREGPT_ALIASES` and merges consecutive turns
    of one role (joined by a blank line) instead of rejecting them.
    """
    if not isinstance(turns, list) or not turns:
        raise BadRow("field 'conversations' must be a non-empty list of turns", "malformed conversations")
    messages: list[dict] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "from" not in turn or not isinstance(turn.get("value"), str):
            raise BadRow(f"conversations[{i}]: expected {{'from': ..., 'value': <str>}}, got {str(turn)[:80]}",
                         "malformed turn")  # fmt: skip
        source = turn["from"]
        role = SHAREGPT_ROLES.get(source) or (SHAREGPT_ALIASES.get(source) if normalize else None)
        if role is None:
            hint = " (normalize=True maps it)" if source in SHAREGPT_ALIASES else ""
            raise BadRow(f"conversations[{i}]: unknown ShareGPT role {source!r}; expected one of "
                         f"{', '.join(SHAREGPT_ROLES)}{hint}", f"unknown role {source!r}")  # fmt: skip
        if normalize and messages and messages[-1]["role"] == role and role != "system":
            messages[-1]["content"] += "\n\n" + turn["value"]
            continue
        if messages and messages[-1]["role"] == role:
            raise BadRow(f"conversations[{i}]: two {source!r} turns in a row (normalize=True merges them)",
                         f"two {role} turns in a row")  # fmt: skip
        messages.append({"role": role, "content": turn["value"]})
    first = 1 if messages[0]["role"] == "system" else 0
    if len(messages) > first and messages[first]["role"] == "assistant":
        raise BadRow("the conversation starts with the assistant", "starts with the assistant")
    return messages


def to_conversation(record: object, *, normalize: bool = False) -> Conversation:
    """Validate one parsed row and turn it into a `Conversation`.

    Raises ValueError describing the problem (missing field, non-string
    content, wrong role order, ...); the caller adds the row's location.
    `normalize` applies to ShareGPT rows (`normalize_sharegpt`).
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"expected an object with 'messages' or 'prompt'/'completion', got {type(record).__name__}")
    if "conversations" in record and "messages" not in record:
        messages = normalize_sharegpt(record["conversations"], normalize=normalize)
        validate_messages(messages)
        return Conversation(messages)
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
