"""Fixtures for the data tests: a SentencePiece tokenizer trained on the
synthetic corpus (no downloads) and small JSONL/Parquet writers."""

import json

import pytest

from posttrain_jax.data import synthetic
from posttrain_jax.tokenizer import load_tokenizer

TEMPLATE = "chatml"
END_OF_TURN = "<|im_end|>"
# What an assistant turn ends with in the loss mask: the end of turn and the "\n" chatml writes after it.
TURN_END = END_OF_TURN + "\n"


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    path = synthetic.train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer", vocab_size=400)
    return load_tokenizer(path)


def chat(user: str, assistant: str, system: str | None = None) -> dict:
    """A chat row."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_jsonl(path, rows) -> str:
    """Write rows (dicts, or raw strings written as-is) one per line."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def write_parquet(path, rows) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def numbered_rows(prefix: str, count: int, *, words: int = 1) -> list[dict]:
    """Distinct chat rows; the assistant reply names the row, e.g. "a 7"."""
    filler = " ".join(["apples"] * words)
    return [chat(f"How many {filler} {i}?", f"{prefix} {i}") for i in range(count)]


def segments(batch):
    """Each example of a batch as a dict of 1-D arrays (its positions only)."""
    for row in range(batch["segment_ids"].shape[0]):
        segment_ids = batch["segment_ids"][row]
        for segment in range(1, int(segment_ids.max()) + 1):
            where = segment_ids == segment
            yield {key: value[row, where] for key, value in batch.items()}


def unshifted(segment) -> tuple[int, ...]:
    """The example ids a segment was made from: its tokens plus its last target."""
    return (*segment["tokens"].tolist(), int(segment["targets"][-1]))
