"""The batch contract: shapes, dtypes, the shift, loss masks, packing and padding."""

import numpy as np
import pytest

from posttrain_jax.data import BATCH_KEYS, make_sft_pipeline
from posttrain_jax.data.packing import build_row, plan_rows
from posttrain_jax.tokenizer import render_chat

from .conftest import TURN_END, TEMPLATE, chat, segments, unshifted, write_jsonl


def test_plan_rows_first_fit_covers_every_draw_once():
    lengths = np.random.default_rng(0).integers(1, 33, size=500)
    offsets, draws = plan_rows(lengths, 32, packing=True, window=4)
    assert sorted(draws.tolist()) == list(range(500))
    row_lengths = np.add.reduceat(lengths[draws], offsets[:-1])
    assert row_lengths.max() <= 32
    # First-fit over a window packs far better than one example per row.
    assert len(offsets) - 1 < 0.7 * 500
    # Within a row, draws keep their stream order.
    assert all(np.all(np.diff(draws[a:b]) > 0) for a, b in zip(offsets[:-1], offsets[1:]))
    offsets, draws = plan_rows(lengths, 32, packing=False)
    assert offsets.tolist() == list(range(501)) and draws.tolist() == list(range(500))
    with pytest.raises(ValueError, match=r"in \[1, 32\]"):
        plan_rows(np.array([33]), 32, packing=True)


def test_build_row_shifts_each_example():
    first = (np.array([10, 11, 12, 13], np.int32), np.array([0, 0, 1, 1], bool))
    second = (np.array([20, 21, 22], np.int32), np.array([0, 1, 0], bool))
    row = build_row([first, second], 8)
    assert row["tokens"].tolist() == [10, 11, 12, 20, 21, 0, 0, 0]
    assert row["targets"].tolist() == [11, 12, 13, 21, 22, 0, 0, 0]
    assert row["loss_mask"].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert row["positions"].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
    assert all(row[k].dtype == np.int32 for k in BATCH_KEYS)


@pytest.fixture(scope="module")
def rows():
    # Varied lengths, a system prompt on some, a two-turn chat on others.
    rows = []
    for i in range(60):
        row = chat(f"What is {i} plus {i % 7}?" + " Think." * (i % 5), f"It is {i + i % 7}.",
                   system="Be brief." if i % 3 == 0 else None)  # fmt: skip
        if i % 4 == 0:
            row["messages"] += [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes"}]
        rows.append(row)
    return rows


@pytest.mark.parametrize("packing", [True, False])
def test_batches_follow_the_contract(tmp_path, tok, rows, packing):
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    seq_len, global_batch = 96, 4
    iterator, stats = make_sft_pipeline(path, tok, template=TEMPLATE, seq_len=seq_len, global_batch=global_batch,
                                        packing=packing, seed=1)  # fmt: skip
    rendered = {tuple(render_chat(tok, r["messages"], template=TEMPLATE).ids): r for r in rows}
    batches = list(iterator)
    assert len(batches) == iterator.num_batches == stats.batches > 0
    seen = []
    for batch in batches:
        assert sorted(batch) == sorted(BATCH_KEYS)
        for key in BATCH_KEYS:
            assert batch[key].shape == (global_batch, seq_len) and batch[key].dtype == np.int32, key
        pad = batch["segment_ids"] == 0
        for key in BATCH_KEYS:
            assert not batch[key][pad].any(), f"padding is not 0 in {key}"
        for row in batch["segment_ids"]:
            # Segments 1..k in order, contiguous, padding only at the end.
            k = row.max()
            changes = row[np.r_[True, row[1:] != row[:-1]]]
            assert changes.tolist() == list(range(1, k + 1)) + ([0] if row[-1] == 0 else [])
            assert k >= 1 and (packing or k == 1)
        for segment in segments(batch):
            n = len(segment["tokens"])
            assert segment["positions"].tolist() == list(range(n))
            assert np.array_equal(segment["targets"][:-1], segment["tokens"][1:])
            ids = unshifted(segment)
            assert ids in rendered, "a row holds a split or foreign example"
            replies = [m["content"] for m in rendered[ids]["messages"] if m["role"] == "assistant"]
            trained = segment["targets"][segment["loss_mask"] == 1]
            assert tok.decode(trained) == "".join(r + TURN_END for r in replies)
            seen.append(ids)
    assert len(seen) == stats.draws == 60 - stats.sources[0].dropped_remainder
    assert len(set(seen)) == len(seen)
    assert stats.tokens == sum(len(s) - 1 for s in seen)
    assert stats.padding_tokens == len(batches) * global_batch * seq_len - stats.tokens
    if packing:
        assert stats.tokens > 0.85 * stats.rows * seq_len  # rows are well filled


def test_truncated_example_fills_a_row(tmp_path, tok):
    path = write_jsonl(tmp_path / "long.jsonl", [chat("Hi", "apples " * 50)] * 2)
    iterator, stats = make_sft_pipeline(path, tok, template=TEMPLATE, seq_len=16, global_batch=2)
    batch = next(iterator)
    assert stats.sources[0].truncated == 2
    assert (batch["segment_ids"] == 1).all() and batch["positions"][0].tolist() == list(range(16))
    full = render_chat(tok, chat("Hi", "apples " * 50)["messages"], template=TEMPLATE).ids
    assert batch["tokens"][0].tolist() == full[:16] and batch["targets"][0].tolist() == full[1:17]
