"""Reading rows and the tokenization pre-pass: formats, masks, bad rows,
length policies and their counts."""

import gzip
import json

import numpy as np
import pytest

from posttrain_jax.data import DataError
from posttrain_jax.data.examples import encode_conversation, tokenize_source
from posttrain_jax.data.sources import expand_paths, to_conversation
from posttrain_jax.tokenizer import CHAT_TEMPLATES, end_of_turn_token, render_chat

from .conftest import TURN_END, TEMPLATE, chat, write_jsonl, write_parquet


def _tokenize(path, tok, **kwargs):
    kwargs.setdefault("seq_len", 256)
    return tokenize_source(path, tok, template=TEMPLATE, **kwargs)


def _trained_text(tok, source, index):
    ids, trained = source.example(index)
    return tok.decode(ids[trained])


def test_chat_rows_train_on_assistant_turns(tmp_path, tok):
    row = chat("What is 2 plus 3?", "5", system="Be brief.")
    row["messages"] += [{"role": "user", "content": "And 4 plus 4?"}, {"role": "assistant", "content": "8"}]
    source = _tokenize(write_jsonl(tmp_path / "a.jsonl", [row]), tok)
    ids, trained = source.example(0)
    assert ids.dtype == np.int32 and trained.dtype == np.bool_
    assert list(ids) == render_chat(tok, row["messages"], template=TEMPLATE).ids
    assert _trained_text(tok, source, 0) == f"5{TURN_END}8{TURN_END}"
    assert source.stats.loss_tokens == int(trained[1:].sum()) and source.stats.tokens == len(ids) - 1


def test_prompt_completion_trains_only_on_completion(tmp_path, tok):
    earlier = [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2"}]
    rows = [
        {"prompt": "What is 2 plus 3?", "completion": "5"},
        {"prompt": earlier + [{"role": "user", "content": "And 3 plus 3?"}], "completion": "6"},
        {"prompt": [{"role": "user", "content": "What is 9 minus 1?"}],
         "completion": [{"role": "assistant", "content": "8"}]},
    ]  # fmt: skip
    source = _tokenize(write_jsonl(tmp_path / "pc.jsonl", rows), tok)
    assert [_trained_text(tok, source, i) for i in range(3)] == [f"{n}{TURN_END}" for n in (5, 6, 8)]
    # The same text as chat rows, rendered identically.
    ids, _ = source.example(0)
    assert list(ids) == render_chat(tok, chat("What is 2 plus 3?", "5")["messages"], template=TEMPLATE).ids


def test_train_on_all(tmp_path, tok):
    source = _tokenize(write_jsonl(tmp_path / "a.jsonl", [chat("Hi", "5")]), tok, train_on="all")
    _, trained = source.example(0)
    assert trained.all()


@pytest.mark.parametrize(
    "line, problem",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"text": "hello"}), "missing field"),
        (json.dumps({"prompt": "only a prompt"}), "missing field"),
        (json.dumps({"messages": [{"role": "user", "content": 3}]}), "content must be a str"),
        (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}), "expected role 'user'"),
        (json.dumps({"messages": "hello"}), "must be a list"),
        (json.dumps([1, 2]), "expected an object"),
        (json.dumps({"prompt": 5, "completion": "x"}), "'prompt' must be a string or a list"),
    ],
)  # fmt: skip
def test_bad_jsonl_row_names_file_and_line(tmp_path, tok, line, problem):
    # Line 3: a blank line 2 still counts in the numbering.
    path = write_jsonl(tmp_path / "bad.jsonl", [chat("Hi", "5"), "", line, chat("Hi", "6")])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{problem}"):
        _tokenize(path, tok)


def test_bad_parquet_row_names_row_index(tmp_path, tok):
    rows = [chat("Hi", "5"), chat("Hi", "6")]
    rows[1]["messages"][1]["content"] = None
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError, match=r"bad\.parquet: row 1: .*content must be a str"):
        _tokenize(path, tok)


def test_parquet_chat_rows(tmp_path, tok):
    rows = [chat("What is 2 plus 3?", "5"), chat("What is 1 plus 1?", "2", system="Be brief.")]
    source = _tokenize(write_parquet(tmp_path / "c.parquet", rows), tok)
    assert len(source) == 2 and _trained_text(tok, source, 1) == f"2{TURN_END}"


def test_skip_bad_rows_counts_and_reports(tmp_path, tok):
    lines = [chat("Hi", "5"), "{oops", {"text": "x"}, chat("Hi", "6"), "", "[]"]
    source = _tokenize(write_jsonl(tmp_path / "mixed.jsonl", lines), tok, on_bad_row="skip")
    stats = source.stats
    assert (stats.rows, stats.examples, stats.skipped_bad_rows) == (5, 2, 3)  # the blank line is no row
    assert [m.split(": ")[0].rsplit("/", 1)[-1] for m in stats.bad_row_samples] == [
        "mixed.jsonl:2", "mixed.jsonl:3", "mixed.jsonl:6"]  # fmt: skip


def test_length_policies_and_counts(tmp_path, tok):
    short = chat("Hi", "5")
    long_reply = chat("Hi", "apples " * 40)
    long_prompt = chat("apples " * 40, "5")  # the reply is past the cut
    no_assistant = {"messages": [{"role": "user", "content": "Hi"}]}
    path = write_jsonl(tmp_path / "l.jsonl", [short, long_reply, long_prompt, no_assistant])
    seq_len = 20
    assert len(render_chat(tok, short["messages"], template=TEMPLATE).ids) <= seq_len

    truncated = _tokenize(path, tok, seq_len=seq_len)
    s = truncated.stats
    assert (s.rows, s.examples, s.truncated, s.dropped_no_loss_tokens, s.dropped_too_long) == (4, 2, 1, 2, 0)
    assert truncated.lengths.max() == seq_len + 1
    full = render_chat(tok, long_reply["messages"], template=TEMPLATE).ids
    assert list(truncated.example(1)[0]) == full[: seq_len + 1]

    dropped = _tokenize(path, tok, seq_len=seq_len, length_policy="drop").stats
    assert (dropped.examples, dropped.truncated, dropped.dropped_too_long, dropped.dropped_no_loss_tokens) == (
        1, 0, 2, 1)  # fmt: skip

    everything = _tokenize(path, tok, seq_len=seq_len, train_on="all").stats
    assert (everything.examples, everything.dropped_no_loss_tokens) == (4, 0)


def test_invalid_options_list_choices(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [chat("Hi", "5")])
    with pytest.raises(ValueError, match="length_policy='cut'.*'truncate', 'drop'"):
        _tokenize(path, tok, length_policy="cut")
    with pytest.raises(ValueError, match="train_on='assistants'"):
        _tokenize(path, tok, train_on="assistants")


def test_paths_globs_directories_gzip(tmp_path, tok):
    write_jsonl(tmp_path / "part-0.jsonl", [chat("Hi", "1")])
    write_parquet(tmp_path / "part-1.parquet", [chat("Hi", "2")])
    with gzip.open(tmp_path / "part-2.jsonl.gz", "wt") as f:
        f.write(json.dumps(chat("Hi", "3")) + "\n")
    assert [p.name for p in expand_paths(tmp_path)] == ["part-0.jsonl", "part-1.parquet", "part-2.jsonl.gz"]
    source = _tokenize(str(tmp_path / "part-*"), tok)
    assert [_trained_text(tok, source, i) for i in range(3)] == [f"{n}{TURN_END}" for n in (1, 2, 3)]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        expand_paths(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="no data files match"):
        expand_paths(tmp_path / "nothing-*.jsonl")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="notes.txt: unsupported data file type"):
        expand_paths(tmp_path / "notes.txt")


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_completion_mask_in_every_template(tok, template):
    earlier = [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2"}]
    conversation = to_conversation({"prompt": earlier + [{"role": "user", "content": "And 3 plus 3?"}],
                                    "completion": "6"})  # fmt: skip
    ids, trained = encode_conversation(tok, conversation, template=template)
    # The turn ends with the end-of-turn token and the "\n" every template but Llama's writes after it.
    eot = end_of_turn_token(template) + ("" if template.startswith("llama") else "\n")
    think = "<think>\n\n</think>\n\n" if template == "qwen3" else ""  # Qwen 3's final turn writes a think block
    assert tok.decode([i for i, t in zip(ids, trained) if t]) == think + "6" + eot
    as_chat = encode_conversation(tok, to_conversation({"messages": conversation.messages}), template=template)
    assert as_chat[0] == ids
    assert tok.decode([i for i, t in zip(*as_chat) if t]) == f"2{eot}{think}6{eot}"


def test_json_array_and_bad_encoding(tmp_path, tok):
    (tmp_path / "array.json").write_text(json.dumps([chat("Hi", "5"), chat("Yo", "6")], indent=2))
    source = _tokenize(tmp_path / "array.json", tok)  # one JSON array: each item is a row
    assert len(source) == 2 and source.stats.rows == 2
    # A file cut off mid-row: the complete items are rows, the damaged one a bad row.
    text = json.dumps([chat("Hi", "5"), chat("Yo", "6")])
    (tmp_path / "broken.json").write_text(text[:-20])
    with pytest.raises(DataError, match=r"broken\.json: item 1: invalid JSON"):
        _tokenize(tmp_path / "broken.json", tok)
    source = _tokenize(tmp_path / "broken.json", tok, on_bad_row="skip")
    assert len(source) == 1 and source.stats.bad_row_reasons == {"invalid JSON": 1}
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(chat("Hi", "5")).encode() + b"\n" + b'{"x": "\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8"):
        _tokenize(tmp_path / "latin1.jsonl", tok)
