"""The data people have: ShareGPT (clean and messy, counted per reason), .json arrays, and Hugging Face
datasets (save_to_disk directories, load_dataset on local files) for SFT, preference and prompt data."""

import json

import pytest

from posttrain_jax.data import SourceSpec, make_sft_pipeline
from posttrain_jax.data.examples import tokenize_source
from posttrain_jax.data.preference import make_preference_eval_pipeline
from posttrain_jax.data.sources import DataError, normalize_sharegpt, read_rows, to_conversation
from posttrain_jax.data.prompts import load_prompts

from .conftest import TEMPLATE, chat, write_jsonl


def _sharegpt(*turns):
    return {"conversations": [{"from": f, "value": v} for f, v in turns]}


CLEAN = _sharegpt(("system", "Be brief."), ("human", "What is 2 plus 3?"), ("gpt", "5"),
                  ("human", "And 4 plus 4?"), ("gpt", "8"))
# Real ShareGPT dumps: each row below is one kind of mess, and the reason it is counted under.
MESSY = [
    (_sharegpt(("human", "hi"), ("chatgpt", "hello")), "unknown role 'chatgpt'"),
    (_sharegpt(("human", "hi"), ("bing", "hello")), "unknown role 'bing'"),
    (_sharegpt(("human", "hi"), ("bard", "hello")), "unknown role 'bard'"),
    (_sharegpt(("user", "hi"), ("gpt", "hello")), "unknown role 'user'"),
    (_sharegpt(("gpt", "Hi, how can I help?"), ("human", "hi"), ("gpt", "hello")), "starts with the assistant"),
    (_sharegpt(("human", "hi"), ("human", "are you there?"), ("gpt", "yes")), "two user turns in a row"),
    ({"conversations": [{"from": "human"}]}, "malformed turn"),
    ({"conversations": []}, "malformed conversations"),
]


def test_sharegpt_row_is_a_conversation():
    conversation = to_conversation(CLEAN)
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conversation.messages[2]["content"] == "5"


def test_messy_sharegpt_counted_per_reason(tmp_path, tok):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [CLEAN] + [row for row, _ in MESSY] + [CLEAN])
    source = tokenize_source(path, tok, template=TEMPLATE, seq_len=256, on_bad_row="skip")
    assert source.stats.rows == len(MESSY) + 2 and len(source) == 2
    assert source.stats.bad_row_reasons == {reason: 1 for _, reason in MESSY}
    from posttrain_jax.data.stats import bad_row_reason_lines

    report = "\n".join(bad_row_reason_lines(source.stats))
    assert "unknown role 'bing': 1" in report and "starts with the assistant: 1" in report


@pytest.mark.parametrize("index", range(len(MESSY)))
def test_messy_sharegpt_error_names_file_row_and_reason(tmp_path, tok, index):
    row, _ = MESSY[index]
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [CLEAN, row])
    with pytest.raises(DataError, match=r"sharegpt\.jsonl:2: .*on_bad_row=\"skip\""):
        tokenize_source(path, tok, template=TEMPLATE, seq_len=256)


def test_normalize_maps_aliases_and_merges_turns(tmp_path, tok):
    messages = normalize_sharegpt(_sharegpt(("user", "hi"), ("user", "are you there?"), ("bing", "yes"),
                                            ("human", "ok"), ("chatgpt", "a"), ("bard", "b"))["conversations"],
                                  normalize=True)
    assert messages == [{"role": "user", "content": "hi\n\nare you there?"}, {"role": "assistant", "content": "yes"},
                        {"role": "user", "content": "ok"}, {"role": "assistant", "content": "a\n\nb"}]
    rows = [row for row, _ in MESSY]
    path = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    iterator, stats = make_sft_pipeline([SourceSpec(path, normalize=True)], tok, template=TEMPLATE, seq_len=64,
                                        global_batch=1, on_bad_row="skip", process_index=0, process_count=1)
    # Aliases and merged turns are kept; a conversation starting with the assistant and malformed rows are not.
    assert stats.sources[0].examples == 5
    assert stats.sources[0].bad_row_reasons == {"starts with the assistant": 1, "malformed turn": 1,
                                                "malformed conversations": 1}


def test_json_array_sources_for_sft_preference_and_prompts(tmp_path, tok):
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps([chat("What is 1 plus 1?", "2"), CLEAN], indent=2))
    assert [r.location.rsplit(": ", 1)[1] for r in read_rows(sft)] == ["item 0", "item 1"]
    source = tokenize_source(sft, tok, template=TEMPLATE, seq_len=256)
    assert len(source) == 2
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}] * 3))
    _, stats = make_preference_eval_pipeline(str(pairs), tok, template=TEMPLATE, seq_len=64, global_pairs=2,
                                             process_index=0, process_count=1)
    assert stats.sources[0].examples == 3
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "2+2?", "answer": "4"}, CLEAN]))
    rows, prompt_stats = load_prompts(str(prompts), tok, template=TEMPLATE, max_prompt_length=256)
    assert prompt_stats.kept == 2 and rows[0].row["answer"] == "4" and rows[1].row["reference"] == "8"
    assert rows[1].source.endswith("prompts.json: item 1")


def test_datasets_save_to_disk_and_load_dataset(tmp_path, tok, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [chat("What is 1 plus 1?", "2"), chat("What is 2 plus 2?", "4"), chat("What is 3 plus 3?", "6")]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    source = tokenize_source(saved, tok, template=TEMPLATE, seq_len=256)
    assert len(source) == 3 and source.stats.rows == 3
    expected = tokenize_source(write_jsonl(tmp_path / "same.jsonl", rows), tok, template=TEMPLATE, seq_len=256)
    assert source.ids.tolist() == expected.ids.tolist() and source.trained.tolist() == expected.trained.tolist()
    # A DatasetDict directory: name a split's directory.
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
                         ).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"DatasetDict .* one split's directory: .*dict/train"):
        tokenize_source(tmp_path / "dict", tok, template=TEMPLATE, seq_len=256)
    assert len(tokenize_source(tmp_path / "dict" / "test", tok, template=TEMPLATE, seq_len=256)) == 1
    # load_dataset on local files, offline (no download is ever attempted).
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "local"
    local.mkdir()
    write_jsonl(local / "train.jsonl", rows)
    write_jsonl(local / "test.jsonl", rows[:2])
    assert len(tokenize_source(f"hf:{local}", tok, template=TEMPLATE, seq_len=256)) == 3
    assert len(tokenize_source(f"hf:{local}:test", tok, template=TEMPLATE, seq_len=256)) == 2
    with pytest.raises(DataError, match=r"hf:.*load_dataset\(.*split='nope'\) failed"):
        tokenize_source(f"hf:{local}:nope", tok, template=TEMPLATE, seq_len=256)


def test_tokenization_shows_a_progress_bar_with_counts(tmp_path, tok, capfd):
    path = write_jsonl(tmp_path / "rows.jsonl", [chat(f"What is {i} plus 1?", str(i + 1)) for i in range(7)])
    tokenize_source(path, tok, template=TEMPLATE, seq_len=256)
    err = capfd.readouterr().err
    assert "tokenizing" in err and "7/7" in err and "row" in err
