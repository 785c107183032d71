"""The synthetic arithmetic data and its SentencePiece tokenizer."""

import json
import re

import pytest

from posttrain_jax.data import make_sft_pipeline, synthetic
from posttrain_jax.tokenizer import CHAT_TEMPLATES, end_of_turn_token, load_tokenizer, render_chat


def test_problems_are_deterministic_and_correct():
    problems = synthetic.generate_problems(500, seed=7)
    assert problems == synthetic.generate_problems(500, seed=7)
    assert problems != synthetic.generate_problems(500, seed=8)
    for p in problems:
        assert 1 <= p.a <= synthetic.MAX_OPERAND and 1 <= p.b <= synthetic.MAX_OPERAND
        assert p.answer == (p.a + p.b if p.op == "+" else p.a - p.b) >= 0
        assert re.findall(r"\d+", p.question) == [str(p.a), str(p.b)]
    assert {p.op for p in problems} == {"+", "-"}
    assert len({p.question.split()[0] for p in problems}) >= 5  # several phrasings


@pytest.mark.parametrize(
    "text, expected, ok",
    [("19", 19, True), ("The answer is 19.", 19, True), ("12 + 7 = 19", 19, True), ("12 + 7 = 18", 19, False),
     ("nineteen", 19, False), ("", 0, False), ("-3", -3, True), ("19 or 20", 19, False)],
)  # fmt: skip
def test_check_answer(text, expected, ok):
    assert synthetic.check_answer(text, expected) is ok


def test_jsonl_rows(tmp_path):
    path = synthetic.write_arithmetic_jsonl(tmp_path / "d" / "train.jsonl", 20, seed=1, show_work=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 20
    for row, problem in zip(rows, synthetic.generate_problems(20, seed=1)):
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["answer"] == problem.answer
        assert synthetic.check_answer(row["messages"][1]["content"], row["answer"])


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_tokenizer_renders_every_template(tok, template):
    problem = synthetic.generate_problems(1)[0]
    encoding = render_chat(tok, problem.messages(), template=template)
    eot = tok.token_to_id(end_of_turn_token(template))
    think = "<think>\n\n</think>\n\n" if template == "qwen3" else ""
    after = "" if template.startswith("llama") else "\n"  # the newline after the end of turn is trained on
    assert tok.decode([i for i, m in zip(encoding.ids, encoding.assistant_mask) if m]) == (
        think + problem.response() + end_of_turn_token(template) + after)  # fmt: skip
    assert eot in encoding.ids
    # Lossless: decoding gives the rendered text back.
    assert tok.decode(encoding.ids) == encoding.text


def test_tokenizer_specials_and_size(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert 300 <= tok.vocab_size <= 400
    assert tok.encode("user")[0] == tok.token_to_id("user")  # role names are single pieces
    assert tok.decode(tok.encode("Tom has 12 apples.")) == "Tom has 12 apples."
    assert [tok.id_to_token(i) for i in tok.encode("12")] == ["1", "2"]  # digits split


def test_quickstart_data_end_to_end(tmp_path):
    paths = synthetic.make_quickstart_data(tmp_path, num_train=300, num_eval=20, vocab_size=350)
    tok = load_tokenizer(paths["tokenizer"])
    iterator, stats = make_sft_pipeline(paths["train"], tok, template="chatml", seq_len=128, global_batch=4,
                                        process_index=0, process_count=1)  # fmt: skip
    assert stats.examples == 300 and stats.sources[0].truncated == 0
    batch = next(iterator)
    assert batch["tokens"].shape == (4, 128) and batch["loss_mask"].sum() > 0
    eval_rows = paths["eval"].read_text().splitlines()
    assert len(eval_rows) == 20 and eval_rows[0] not in paths["train"].read_text().splitlines()[:1]
