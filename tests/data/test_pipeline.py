"""Pipelines: mixing, epochs, determinism, per-host shards, resume, eval."""

import json
from collections import Counter

import numpy as np
import pytest

from posttrain_jax.data import SourceSpec, make_eval_pipeline, make_sft_pipeline
from posttrain_jax.data.mixing import mixture_order
from posttrain_jax.tokenizer import render_chat

from .conftest import TURN_END, TEMPLATE, numbered_rows, segments, unshifted, write_jsonl

SEQ_LEN = 64


def _pipeline(sources, tok, **kwargs):
    kwargs.setdefault("seq_len", SEQ_LEN)
    kwargs.setdefault("global_batch", 4)
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return make_sft_pipeline(sources, tok, template=TEMPLATE, **kwargs)


def _replies(tok, batches):
    """The assistant reply of every example in the batches, in order."""
    return [
        tok.decode(s["targets"][s["loss_mask"] == 1]).removesuffix(TURN_END)
        for batch in batches for s in segments(batch)
    ]  # fmt: skip


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.fixture
def two_sources(tmp_path):
    return (write_jsonl(tmp_path / "a.jsonl", numbered_rows("a", 40)),
            write_jsonl(tmp_path / "b.jsonl", numbered_rows("b", 20)))  # fmt: skip


def test_mixture_follows_weights_then_drains():
    source, example = mixture_order([3000, 3000], epochs=[1, 1], weights=[3.0, 1.0], seed=0)
    assert len(source) == 6000
    # While both have draws left, every stretch is ~3:1 (stride scheduling:
    # within one draw per source of exact).
    for start in range(0, 4000, 500):
        share = np.mean(source[start : start + 500] == 0)
        assert abs(share - 0.75) <= 2 / 500, (start, share)
    # Source 0 runs out after 4000 draws; source 1 fills the rest.
    assert (source[4002:] == 1).all()
    for i in (0, 1):
        assert sorted(example[source == i].tolist()) == list(range(3000))


def test_mixture_epochs_and_default_weights():
    source, example = mixture_order([100, 10], epochs=[2, 0.5], weights=[None, None], seed=3)
    assert Counter(source.tolist()) == {0: 200, 1: 5}
    a = example[source == 0]
    # Each epoch is a full pass (each example once), reshuffled.
    assert sorted(a[:100].tolist()) == sorted(a[100:].tolist()) == list(range(100))
    assert a[:100].tolist() != a[100:].tolist()
    assert len(set(example[source == 1].tolist())) == 5
    # weight=None keeps every source's share constant: b is spread evenly.
    positions = np.nonzero(source == 1)[0]
    assert np.all(np.abs(positions - (np.arange(5) + 0.5) * 41) <= 41)
    again = mixture_order([100, 10], epochs=[2, 0.5], weights=[None, None], seed=3)
    assert np.array_equal(again[0], source) and np.array_equal(again[1], example)


def test_pipeline_mixes_sources_by_epochs(two_sources, tok):
    a, b = two_sources
    iterator, stats = _pipeline([SourceSpec(a, epochs=2), {"path": b, "epochs": 0.5, "name": "b"}], tok,
                                packing=False, global_batch=1)  # fmt: skip
    replies = _replies(tok, iterator)
    counts = Counter(r.split()[0] for r in replies)
    assert counts == {"a": 80, "b": 10}
    assert all(n == 2 for r, n in Counter(replies).items() if r.startswith("a"))
    assert [s.draws for s in stats.sources] == [80, 10] and stats.sources[1].name == "b"
    assert stats.batches == iterator.num_batches == 90
    assert "b: 20 rows -> 20 examples" in stats.report()
    with pytest.raises(StopIteration):
        next(iterator)


def test_epochs_override_and_weights(two_sources, tok):
    a, b = two_sources
    _, stats = _pipeline([SourceSpec(a, epochs=3), SourceSpec(b)], tok, epochs=1)
    assert [s.draws for s in stats.sources] == [40, 20]
    iterator, _ = _pipeline([SourceSpec(a, weight=1.0), SourceSpec(b, weight=1.0)], tok, packing=False, global_batch=2)
    first = [r.split()[0] for r in _replies(tok, [next(iterator) for _ in range(10)])]
    assert abs(first.count("a") - 10) <= 1  # 1:1 while both last


def test_deterministic_given_seed(two_sources, tok):
    take = lambda seed: list(_pipeline(list(two_sources), tok, seed=seed)[0])  # noqa: E731
    assert _same(take(0), take(0))
    assert not _same(take(0), take(1))


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("process_count", [2, 4])
def test_hosts_get_disjoint_covering_shards(two_sources, tok, packing, process_count):
    common = dict(global_batch=8, packing=packing, seed=5)
    single, _ = _pipeline(list(two_sources), tok, **common)
    hosts = [
        _pipeline(list(two_sources), tok, process_index=i, process_count=process_count, **common)[0]
        for i in range(process_count)
    ]  # fmt: skip
    assert all(h.num_batches == single.num_batches and h.rows == 8 // process_count for h in hosts)
    for global_batch in single:
        parts = [next(h) for h in hosts]
        # Host i holds block i of the global batch: disjoint, and together all of it.
        for key, value in global_batch.items():
            assert np.array_equal(np.concatenate([p[key] for p in parts]), value)
    for h in hosts:
        with pytest.raises(StopIteration):
            next(h)


def test_resume_from_state(two_sources, tok):
    iterator, _ = _pipeline(list(two_sources), tok, seed=2, global_batch=2)
    assert iterator.num_batches >= 6
    for _ in range(3):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = [next(iterator) for _ in range(3)]
    restored, _ = _pipeline(list(two_sources), tok, seed=2, global_batch=2)
    restored.set_state(state)
    assert _same([next(restored) for _ in range(3)], expected)
    # The state is the global batch index: it resumes on another host count too.
    half, _ = _pipeline(list(two_sources), tok, seed=2, global_batch=2, process_index=1, process_count=2)
    half.set_state(state)
    assert np.array_equal(next(half)["tokens"], expected[0]["tokens"][1:])


def test_state_from_another_pipeline_is_refused(two_sources, tok):
    state = _pipeline(list(two_sources), tok, seed=2)[0].get_state()
    other, _ = _pipeline(list(two_sources), tok, seed=3)
    with pytest.raises(ValueError, match="different pipeline.*seed"):
        other.set_state(state)
    with pytest.raises(ValueError, match="not a data iterator state"):
        other.set_state({"next_index": 3})


def test_remainder_is_counted(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", numbered_rows("a", 10))
    iterator, stats = _pipeline(path, tok, packing=False, global_batch=4)
    assert iterator.num_batches == 2 and stats.sources[0].dropped_remainder == 2 and stats.draws == 8
    assert "draws dropped in the last partial batch: 2" in stats.report()
    with pytest.raises(ValueError, match="fewer than one global batch of 16"):
        _pipeline(path, tok, packing=False, global_batch=16)


@pytest.mark.parametrize("packing", [False, True])
def test_eval_pipeline_is_finite_and_padded(tmp_path, tok, packing):
    rows = numbered_rows("e", 7)
    path = write_jsonl(tmp_path / "eval.jsonl", rows)
    kwargs = dict(template=TEMPLATE, seq_len=SEQ_LEN, global_batch=4, packing=packing, process_count=1,
                  process_index=0)  # fmt: skip
    iterator, stats = make_eval_pipeline(path, tok, **kwargs)
    batches = list(iterator)
    assert len(batches) == iterator.num_batches == -(-stats.rows // 4)
    assert all(b[k].shape == (4, SEQ_LEN) for b in batches for k in b)
    replies = _replies(tok, batches)
    assert sorted(replies) == sorted(r["messages"][1]["content"] for r in rows)
    if not packing:
        assert replies == [f"e {i}" for i in range(7)]  # file order
        assert stats.padding_rows == 1 and not any(batches[-1][k][-1].any() for k in batches[-1])
    iterator.reset()
    assert _same(list(iterator), batches)
    # Two hosts: same number of batches each, together every example once.
    hosts = [make_eval_pipeline(path, tok, **{**kwargs, "process_index": i, "process_count": 2})[0] for i in (0, 1)]
    assert hosts[0].num_batches == hosts[1].num_batches == len(batches)
    assert sorted(_replies(tok, [b for h in hosts for b in h])) == sorted(replies)
    with pytest.raises(ValueError, match="eval reads every example once"):
        make_eval_pipeline(SourceSpec(path, epochs=2), tok, **kwargs)


def test_config_errors(two_sources, tok):
    a, b = two_sources
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        _pipeline(a, tok, global_batch=4, process_count=3)
    with pytest.raises(ValueError, match="to every source or to none"):
        _pipeline([SourceSpec(a, weight=2.0), SourceSpec(b)], tok)
    with pytest.raises(ValueError, match="weight must be > 0"):
        _pipeline([SourceSpec(a, weight=0.0)], tok)
    with pytest.raises(ValueError, match=r"unknown data source key\(s\) \['wieght'\]"):
        _pipeline([{"path": a, "wieght": 2.0}], tok)
    bad = write_jsonl(a.replace("a.jsonl", "bad.jsonl"), [{"text": "hi"}])
    with pytest.raises(ValueError, match="(?s)bad.jsonl contributes no examples.*skipped bad rows: 1"):
        _pipeline([a, bad], tok, on_bad_row="skip")
    with pytest.raises(ValueError, match="unknown chat template 'chatlm'"):
        make_sft_pipeline(a, tok, template="chatlm", seq_len=SEQ_LEN, global_batch=4)


def test_example_boundary_check(tmp_path, tok):
    # Every segment is one whole rendered example (no cross-example targets).
    rows = numbered_rows("x", 12, words=3)
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    rendered = {tuple(render_chat(tok, r["messages"], template=TEMPLATE).ids) for r in rows}
    iterator, _ = _pipeline(path, tok, global_batch=2)
    assert all(unshifted(s) in rendered for batch in iterator for s in segments(batch))


def test_grain_checkpoint_handler_round_trip(two_sources, tok, tmp_path):
    from etils import epath
    from grain.checkpoint import CheckpointHandler

    iterator, _ = _pipeline(list(two_sources), tok, seed=4, global_batch=2)
    next(iterator)
    CheckpointHandler().save(epath.Path(tmp_path), item=iterator)
    expected = next(iterator)
    restored, _ = _pipeline(list(two_sources), tok, seed=4, global_batch=2)
    CheckpointHandler().restore(epath.Path(tmp_path), item=restored)
    assert _same([next(restored)], [expected])
