"""Preference pipelines: batch contract, masks, pairing, strengths, edited
expansion, bad rows, truncation, resume, eval and per-host shards."""

import json
from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.losses.dpo import batch_sequence_ids
from posttrain_jax.data import BATCH_KEYS, DataError, SourceSpec
from posttrain_jax.data.preference import (
    LLAMA2_STRENGTH_MARGINS,
    PREFERENCE_BATCH_KEYS,
    STRENGTHS,
    make_preference_eval_pipeline,
    make_preference_pipeline,
    write_arithmetic_preferences,
)
from posttrain_jax.data.preference_rows import PairEncoder, response_caps, to_preference_row
from posttrain_jax.data.synthetic import check_answer
from posttrain_jax.tokenizer import SentencePieceTokenizer, render_chat

from .conftest import END_OF_TURN, TEMPLATE, TURN_END, write_jsonl, write_parquet

SEQ_LEN = 96


def _pipeline(sources, tok, **kwargs):
    kwargs.setdefault("template", TEMPLATE)
    kwargs.setdefault("seq_len", SEQ_LEN)
    kwargs.setdefault("global_pairs", 4)
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return make_preference_pipeline(sources, tok, **kwargs)


def _rows(count, prefix="", **extra):
    """Distinct pairs: the replies name the row, e.g. chosen "a 7", rejected "b 7"."""
    return [{"prompt": f"How many apples {prefix}{i}?", "chosen": f"a {prefix}{i}", "rejected": f"b {prefix}{i}",
             "margin": i / 10, **extra} for i in range(count)]  # fmt: skip


def _pairs(batch):
    """Every real pair of a batch: its two sequences (1-D arrays) and per-pair values."""
    rows, pairs_per_row = batch["pair_mask"].shape
    for r in range(rows):
        for k in range(pairs_per_row):
            if not batch["pair_mask"][r, k]:
                continue
            sequences = [{key: batch[key][r, batch["segment_ids"][r] == s] for key in BATCH_KEYS}
                         for s in (2 * k + 1, 2 * k + 2)]  # fmt: skip
            yield {"chosen": sequences[0], "rejected": sequences[1], "row": r,
                   **{key: batch[key][r, k] for key in ("margin", "strength", "chosen_last", "rejected_last")}}


def _ids(sequence):
    """The unshifted ids a sequence was made from."""
    return [*sequence["tokens"].tolist(), int(sequence["targets"][-1])]


def _reply(tok, sequence):
    return tok.decode(sequence["targets"][sequence["loss_mask"] == 1]).removesuffix(TURN_END)


def _replies(tok, batches):
    return [(_reply(tok, p["chosen"]), _reply(tok, p["rejected"])) for b in batches for p in _pairs(b)]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", _rows(30))


@pytest.mark.parametrize("packing", [False, True])
def test_batch_contract(pairs_file, tok, packing):
    iterator, stats = _pipeline(pairs_file, tok, packing=packing, global_pairs=8, seed=1)
    rows, per_row = iterator.rows, iterator.pairs_per_row
    assert iterator.pairs == iterator.global_pairs == 8 and iterator.num_batches == 3
    assert (per_row == 1 and rows == 8) if not packing else (per_row > 1 and rows < 8)
    seen = []
    for batch in iterator:
        assert tuple(batch) == PREFERENCE_BATCH_KEYS
        for key in BATCH_KEYS:
            assert batch[key].shape == (rows, SEQ_LEN) and batch[key].dtype == np.int32
        for key in ("margin", "pair_mask", "strength", "chosen_last", "rejected_last"):
            assert batch[key].shape == (rows, per_row)
            assert batch[key].dtype == (np.float32 if key == "margin" else np.int32)
        assert batch["pair_mask"].sum() == 8
        # Padding is 0 everywhere; pair k of a row is segments 2k+1, 2k+2, packed from the left.
        padding = batch["segment_ids"] == 0
        assert not any(batch[key][padding].any() for key in BATCH_KEYS)
        for r in range(rows):
            segments = batch["segment_ids"][r]
            assert segments.max() == 2 * batch["pair_mask"][r].sum()
            assert np.array_equal(batch["pair_mask"][r], np.sort(batch["pair_mask"][r])[::-1])
        for pair in _pairs(batch):
            chosen, rejected = _reply(tok, pair["chosen"]), _reply(tok, pair["rejected"])
            i = int(chosen.split()[1])
            assert (chosen, rejected) == (f"a {i}", f"b {i}")
            assert pair["margin"] == np.float32(i / 10) and pair["strength"] == 0
            segments = batch["segment_ids"][pair["row"]]
            for side in ("chosen", "rejected"):
                last = pair[f"{side}_last"]
                assert segments[last] == segments[last - 1]
                assert last + 1 == SEQ_LEN or segments[last + 1] != segments[last]
                assert pair[side]["positions"][-1] == len(pair[side]["tokens"]) - 1
            seen.append(i)
    assert len(seen) == len(set(seen)) == 24 == stats.draws
    assert stats.sources[0].dropped_remainder == 6 and stats.global_batch == rows


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_prompt_shared_and_loss_on_responses_only(tmp_path, tok, template):
    rows = [
        {"prompt": "What is 2 plus 3?", "chosen": "5", "rejected": "6"},
        # A multi-turn prompt: its assistant turn is context, never trained.
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is 1 plus 1?"}],
         "chosen": [{"role": "assistant", "content": "2"}], "rejected": "3"},
        # Whole conversations, no prompt field.
        {"chosen": [{"role": "user", "content": "What is 4 minus 1?"}, {"role": "assistant", "content": "3"}],
         "rejected": [{"role": "user", "content": "What is 4 minus 1?"}, {"role": "assistant", "content": "5"}]},
        # A prompt, and a response that repeats it.
        {"prompt": "What is 3 plus 3?", "rejected": "7",
         "chosen": [{"role": "user", "content": "What is 3 plus 3?"}, {"role": "assistant", "content": "6"}]},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    iterator, _ = make_preference_eval_pipeline(path, tok, template=template, seq_len=SEQ_LEN * 2, global_pairs=4,
                                                process_index=0, process_count=1)  # fmt: skip
    pairs = list(_pairs(next(iterator)))
    assert len(pairs) == 4
    end = "<|eot_id|>" if template == "llama3" else TURN_END
    for row, pair in zip(rows, pairs):
        parsed = to_preference_row(row)
        prompt = render_chat(tok, parsed.context, template=template, add_generation_prompt=True).ids
        for side in ("chosen", "rejected"):
            sequence = pair[side]
            full = render_chat(tok, [*parsed.context, parsed.responses[side]], template=template)
            assert _ids(sequence) == full.ids and full.ids[: len(prompt)] == prompt
            # Targets at index >= len(prompt) - 1 are response tokens; only those are trained.
            assert not sequence["loss_mask"][: len(prompt) - 1].any()
            trained = sequence["targets"][sequence["loss_mask"] == 1]
            assert tok.decode(trained) == parsed.responses[side]["content"] + end
            assert np.array_equal(sequence["loss_mask"][len(prompt) - 1 :],
                                  np.asarray(full.assistant_mask[len(prompt) :], np.int32))  # fmt: skip
        assert _ids(pair["chosen"])[: len(prompt)] == _ids(pair["rejected"])[: len(prompt)]


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_mask_special_tokens(pairs_file, tok, template):
    kwargs = dict(template=template, global_pairs=30, process_index=0, process_count=1, seq_len=SEQ_LEN)
    plain = list(_pairs(next(make_preference_eval_pipeline(pairs_file, tok, **kwargs)[0])))
    masked = list(_pairs(next(make_preference_eval_pipeline(pairs_file, tok, mask_special_tokens=True, **kwargs)[0])))
    end = tok.token_to_id("<|eot_id|>" if template == "llama3" else END_OF_TURN)
    specials = {tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                                             "<|end_header_id|>", "<|eot_id|>")}  # fmt: skip
    for a, b in zip(plain, masked):
        for side in ("chosen", "rejected"):
            assert np.array_equal(a[side]["tokens"], b[side]["tokens"])
            dropped = (a[side]["loss_mask"] == 1) & (b[side]["loss_mask"] == 0)
            assert a[side]["targets"][dropped].tolist() == [end]  # only the end-of-turn token (not the "\n")
            assert not (b[side]["loss_mask"] & ~a[side]["loss_mask"]).any()
            assert not set(b[side]["targets"][b[side]["loss_mask"] == 1].tolist()) & specials
        assert _reply(tok, b["chosen"]).startswith("a ")


def test_pair_layout_matches_loss_side_sequence_ids(pairs_file, tok):
    """`losses.dpo.batch_sequence_ids` gives flat pair p = r * P + k, aligned with margin.reshape(-1)."""
    iterator, _ = _pipeline(pairs_file, tok, packing=True, global_pairs=8)
    batch = next(iterator)
    values = np.random.default_rng(0).normal(size=batch["tokens"].shape).astype(np.float32) * batch["loss_mask"]
    ids, num_pairs = batch_sequence_ids(jnp.asarray(batch["segment_ids"]), iterator.pairs_per_row)
    assert num_pairs == batch["margin"].size
    flat = np.bincount(np.asarray(ids).ravel(), weights=values.ravel(), minlength=2 * num_pairs + 1)
    for r in range(iterator.rows):
        for k in range(iterator.pairs_per_row):
            p, segments = r * iterator.pairs_per_row + k, batch["segment_ids"][r]
            np.testing.assert_allclose(flat[2 * p + 1], values[r, segments == 2 * k + 1].sum(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(flat[2 * p + 2], values[r, segments == 2 * k + 2].sum(), rtol=1e-5, atol=1e-6)
    assert (flat[1::2][batch["pair_mask"].reshape(-1) == 0] == 0).all()


def test_strength_filter_and_margins(tmp_path, tok):
    rows = [{**row, "strength": STRENGTHS[i % 4].upper() if i % 5 else None}
            for i, row in enumerate(_rows(40))]  # fmt: skip
    for row in rows[:10]:
        del row["margin"]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    keep = ["significantly better", "Better"]
    iterator, stats = make_preference_eval_pipeline(path, tok, template=TEMPLATE, seq_len=SEQ_LEN, global_pairs=40,
                                                    keep_strengths=keep, strength_margins=LLAMA2_STRENGTH_MARGINS,
                                                    process_index=0, process_count=1)  # fmt: skip
    kept = {int(_reply(tok, p["chosen"]).split()[1]): p for p in _pairs(next(iterator))}
    expected = {i for i in range(40) if i % 5 == 0 or i % 4 in (0, 1)}  # no strength, or a top-two one
    assert set(kept) == expected and stats.sources[0].filtered_by_strength == 40 - len(expected)
    for i, pair in kept.items():
        strength = 0 if i % 5 == 0 else i % 4 + 1
        assert pair["strength"] == strength
        # An explicit margin wins; else the strength's margin; else 0.
        margin = i / 10 if i >= 10 else LLAMA2_STRENGTH_MARGINS[STRENGTHS[strength - 1]] if strength else 0.0
        assert pair["margin"] == pytest.approx(margin)
    assert f"rows filtered by strength: {40 - len(expected)}" in stats.report()
    with pytest.raises(ValueError, match="strength 'best' is not one of"):
        _pipeline(path, tok, keep_strengths=["best"])
    with pytest.raises(ValueError, match="strength_margins has no margin for 'better'"):
        _pipeline(path, tok, keep_strengths=keep, strength_margins={"significantly better": 1.0})


def test_edited_expands_into_three_pairs(tmp_path, tok):
    rows = [{"prompt": "What is 1 plus 2?", "edited": "1 + 2 = 3", "chosen": "3", "rejected": "4", "margin": 2.0,
             "strength": "better"}, *_rows(3)]  # fmt: skip
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    iterator, stats = make_preference_eval_pipeline(path, tok, template=TEMPLATE, seq_len=SEQ_LEN, global_pairs=6,
                                                    process_index=0, process_count=1)  # fmt: skip
    pairs = list(_pairs(next(iterator)))
    got = [(_reply(tok, p["chosen"]), _reply(tok, p["rejected"]), float(p["margin"]), int(p["strength"]))
           for p in pairs[:3]]  # fmt: skip
    assert got == [("1 + 2 = 3", "3", 0.0, 0), ("1 + 2 = 3", "4", 0.0, 0), ("3", "4", 2.0, 2)]
    assert len(pairs) == 6 and stats.sources[0].edited_rows == 1 and stats.sources[0].examples == 6
    assert "4 rows -> 6 pairs" in stats.report()


def test_bad_rows_name_file_and_line_or_are_counted(tmp_path, tok):
    good = _rows(8)
    bad = [
        ({"prompt": "Hi", "chosen": "same", "rejected": "same"}, "identical 'chosen' and 'rejected'"),
        ({"prompt": "Hi", "chosen": "  ", "rejected": "no"}, "empty 'chosen' response"),
        ({"prompt": "Hi", "chosen": "yes"}, "missing field 'rejected'"),
        ({"chosen": "yes", "rejected": "no"}, "missing field 'prompt'"),
        ({"prompt": "Hi", "chosen": "yes", "rejected": "no", "strength": "much better"}, "strength 'much better'"),
        ({"prompt": "Hi", "chosen": "yes", "rejected": "no", "margin": "1"}, "'margin' must be a finite number"),
        ({"prompt": "Hi", "chosen": [{"role": "user", "content": "yes"}], "rejected": "no"}, "must be the assistant"),
        ({"prompt": "Hi", "chosen": [{"role": "user", "content": "Ho"}, {"role": "assistant", "content": "a"}],
          "rejected": "b"}, "differ from 'prompt'"),
        ({"prompt": "Hi", "chosen": "yes", "rejected": "no", "edited": "yes"}, "identical 'edited' and 'chosen'"),
        ("{not json", "invalid JSON"),
    ]  # fmt: skip
    for row, message in bad:
        path = write_jsonl(tmp_path / "bad.jsonl", [*good[:3], row, *good[3:]])
        with pytest.raises(DataError, match=rf"bad.jsonl:4: .*{message}"):
            _pipeline(path, tok)
    path = write_jsonl(tmp_path / "bad.jsonl", good + [row for row, _ in bad])
    iterator, stats = _pipeline(path, tok, on_bad_row="skip")
    assert stats.sources[0].skipped_bad_rows == len(bad) and stats.sources[0].examples == 8
    assert "skipped bad rows: 10" in stats.report() and "bad.jsonl:9: identical" in stats.report()
    parquet = write_parquet(tmp_path / "bad.parquet", [*good, {"prompt": "Hi", "chosen": "x", "rejected": None}])
    with pytest.raises(DataError, match=r"bad.parquet: row 8: missing field 'rejected'"):
        _pipeline(parquet, tok)
    assert _pipeline(parquet, tok, on_bad_row="skip")[1].sources[0].skipped_bad_rows == 1


def test_truncation_keeps_prompt_and_drop_policy(tmp_path, tok):
    long_reply = " ".join(["apples"] * 60)
    rows = [{"prompt": "How many apples?", "chosen": long_reply + " 1", "rejected": "b 1"},
            {"prompt": "How many apples?", "chosen": long_reply + " 2", "rejected": long_reply + " 3"},
            {"prompt": "How many " + " ".join(["apples"] * 80) + "?", "chosen": "a", "rejected": "b"},
            *_rows(4)]  # fmt: skip
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    kwargs = dict(template=TEMPLATE, seq_len=SEQ_LEN, global_pairs=1, process_index=0, process_count=1)
    iterator, stats = make_preference_eval_pipeline(path, tok, **kwargs)
    source = stats.sources[0]
    # Row 2: the responses only differ past the cut -> identical -> dropped; row 3: the prompt alone is too long.
    assert (source.examples, source.truncated, source.dropped_too_long) == (5, 1, 2)
    first = list(_pairs(next(iterator)))[0]
    prompt = render_chat(tok, [{"role": "user", "content": "How many apples?"}], template=TEMPLATE,
                         add_generation_prompt=True).ids  # fmt: skip
    chosen, rejected = _ids(first["chosen"]), _ids(first["rejected"])
    assert chosen[: len(prompt)] == rejected[: len(prompt)] == prompt
    assert len(chosen) - 1 + len(rejected) - 1 == SEQ_LEN and _reply(tok, first["rejected"]) == "b 1"
    assert _reply(tok, first["chosen"]).startswith("apples apples")
    _, dropped = make_preference_eval_pipeline(path, tok, length_policy="drop", **kwargs)
    assert (dropped.sources[0].examples, dropped.sources[0].dropped_too_long) == (4, 3)
    assert response_caps(10, (50, 5), 40) == (17, 5) and response_caps(10, (50, 50), 41) == (11, 12)
    assert response_caps(10, (5, 5), 40) == (5, 5) and response_caps(21, (5, 5), 40) is None


def test_resume_exactly_and_on_another_host_count(pairs_file, tok):
    iterator, _ = _pipeline(pairs_file, tok, seed=3, global_pairs=2, packing=True)
    for _ in range(4):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = [next(iterator) for _ in range(3)]
    restored, _ = _pipeline(pairs_file, tok, seed=3, global_pairs=2, packing=True)
    restored.set_state(state)
    assert _same([next(restored) for _ in range(3)], expected)
    half, _ = _pipeline(pairs_file, tok, seed=3, global_pairs=2, packing=True, process_index=1, process_count=2)
    half.set_state(state)
    assert _replies(tok, [next(half)]) == _replies(tok, expected[:1])[1:]
    other, _ = _pipeline(pairs_file, tok, seed=4, global_pairs=2, packing=True)
    with pytest.raises(ValueError, match="different pipeline"):
        other.set_state(state)


@pytest.mark.parametrize("packing", [False, True])
def test_eval_pipeline_every_pair_once_padded(tmp_path, tok, packing):
    path = write_jsonl(tmp_path / "eval.jsonl", _rows(7))
    kwargs = dict(template=TEMPLATE, seq_len=SEQ_LEN, global_pairs=4, packing=packing)
    iterator, stats = make_preference_eval_pipeline(path, tok, process_index=0, process_count=1, **kwargs)
    batches = list(iterator)
    assert len(batches) == iterator.num_batches == 2 and stats.empty_pair_slots == 1
    assert [b["pair_mask"].sum() for b in batches] == [4, 3]
    replies = _replies(tok, batches)
    assert sorted(replies) == sorted((f"a {i}", f"b {i}") for i in range(7))
    if not packing:
        assert replies == [(f"a {i}", f"b {i}") for i in range(7)]  # file order
        assert not any(batches[-1][key][-1].any() for key in batches[-1])
    iterator.reset()
    assert _same(list(iterator), batches)
    hosts = [make_preference_eval_pipeline(path, tok, process_index=i, process_count=2, **kwargs)[0] for i in (0, 1)]
    assert hosts[0].num_batches == hosts[1].num_batches == 2 and hosts[0].pairs == 2
    assert sorted(_replies(tok, [b for h in hosts for b in h])) == sorted(replies)
    with pytest.raises(ValueError, match="eval reads every pair once"):
        make_preference_eval_pipeline(SourceSpec(path, epochs=2), tok, process_index=0, process_count=1, **kwargs)


@pytest.mark.parametrize("packing", [False, True])
def test_hosts_get_disjoint_covering_pairs(tmp_path, tok, packing):
    sources = [SourceSpec(write_jsonl(tmp_path / "a.jsonl", _rows(30, "x")), epochs=2),
               SourceSpec(write_jsonl(tmp_path / "b.jsonl", _rows(10, "y")))]  # fmt: skip
    common = dict(global_pairs=8, packing=packing, seed=5, rows_multiple=2)
    single, stats = _pipeline(sources, tok, **common)
    used = [s.draws - s.dropped_remainder for s in stats.sources]
    assert Counter(r[0].split()[1][0] for r in _replies(tok, single)) == {"x": used[0], "y": used[1]}
    assert stats.sources[0].draws == 60 and sum(used) == 64
    single, _ = _pipeline(sources, tok, **common)
    hosts = [_pipeline(sources, tok, process_index=i, process_count=4, **common)[0] for i in range(4)]
    assert all(h.num_batches == single.num_batches == 8 and h.pairs == 2 and h.rows % 2 == 0 for h in hosts)
    for global_batch in single:
        parts = [next(h) for h in hosts]
        assert sorted(_replies(tok, parts)) == sorted(_replies(tok, [global_batch]))
        if not packing:  # one pair per row: host h holds rows [2h, 2h + 2) of the global batch
            for key, value in global_batch.items():
                assert np.array_equal(np.concatenate([p[key] for p in parts]), value)
    for h in hosts:
        with pytest.raises(StopIteration):
            next(h)


def test_deterministic_and_config_errors(pairs_file, tok):
    take = lambda seed: list(_pipeline(pairs_file, tok, seed=seed, packing=True)[0])  # noqa: E731
    assert _same(take(0), take(0)) and not _same(take(0), take(1))
    with pytest.raises(ValueError, match="global_pairs 4 must be a positive multiple of the 3 processes"):
        _pipeline(pairs_file, tok, process_count=3)
    with pytest.raises(ValueError, match="fewer than one global batch of 64"):
        _pipeline(pairs_file, tok, global_pairs=64)
    bad = write_jsonl(pairs_file.replace("pairs.jsonl", "bad.jsonl"), [{"prompt": "x"}])
    with pytest.raises(ValueError, match="(?s)bad.jsonl contributes no pairs.*skipped bad rows: 1"):
        _pipeline([pairs_file, bad], tok, on_bad_row="skip")
    with pytest.raises(ValueError, match="length_policy='cut' is not valid"):
        _pipeline(pairs_file, tok, length_policy="cut")


class _MergingTokenizer(SentencePieceTokenizer):
    """Merges "\\n" with the following letter into one (fake) id, as some BPE
    tokenizers merge across the prompt/reply boundary."""

    def __init__(self, base):
        self.__dict__.update(base.__dict__)
        self.newline = base.encode("\n")[-1]

    def encode_with_offsets(self, text):
        ids, offsets = super().encode_with_offsets(text)
        out_ids, out_offsets = [], []
        for i, o in zip(ids, offsets):
            if out_ids and out_ids[-1] == self.newline and text[o[0] : o[1]].isalpha():
                out_ids[-1], out_offsets[-1] = self.vocab_size, (out_offsets[-1][0], o[1])
            else:
                out_ids.append(i)
                out_offsets.append(o)
        return out_ids, out_offsets


def test_prompt_ids_kept_when_the_tokenizer_merges_across_the_boundary(tok):
    merging = _MergingTokenizer(tok)
    row = to_preference_row({"prompt": "Hi", "chosen": "yes", "rejected": "no"})
    full = render_chat(merging, [*row.context, row.responses["chosen"]], template=TEMPLATE)
    assert merging.vocab_size in full.ids  # "\n" + "y" merged
    prompt_ids, responses = PairEncoder(merging, template=TEMPLATE, mask_special_tokens=False).encode(row)
    assert prompt_ids == render_chat(merging, row.context, template=TEMPLATE, add_generation_prompt=True).ids
    for side, text in (("chosen", "yes"), ("rejected", "no")):
        ids, trained = responses[side]
        assert ids == merging.encode(text + END_OF_TURN + "\n")  # the reply encoded on its own
        assert merging.decode([i for i, t in zip(ids, trained) if t]) == text + TURN_END


def test_write_arithmetic_preferences(tmp_path, tok):
    path = write_arithmetic_preferences(tmp_path / "p.jsonl", 50, seed=3, strengths=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    again = write_arithmetic_preferences(tmp_path / "q.jsonl", 50, seed=3, strengths=True)
    assert path.read_text() == again.read_text()
    for row in rows:
        assert check_answer(row["chosen"], row["answer"]) and not check_answer(row["rejected"], row["answer"])
        assert row["chosen"].rsplit("=", 1)[0] == row["rejected"].rsplit("=", 1)[0]
        assert int(row["rejected"].split("= ")[1]) >= 0 and row["strength"] in STRENGTHS
    _, stats = _pipeline(str(path), tok, seq_len=160, global_pairs=10, keep_strengths=STRENGTHS[:2])
    assert stats.sources[0].examples + stats.sources[0].filtered_by_strength == 50
