"""Tests for posttrain_jax.tokenizer.

Both tokenizers are trained here on a tiny generated corpus (no downloads):
a SentencePiece BPE model (Gemma-like specials) and a byte-level BPE
tokenizer.json (Llama-3-like specials). Both know the chat tokens of every
template.
"""

import json
import random

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as RawHFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from posttrain_jax.tokenizer import (
    CHAT_TEMPLATES,
    HFTokenizer,
    SentencePieceTokenizer,
    end_of_turn_token,
    load_tokenizer,
    render_chat,
)

CHAT_TOKENS = [
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>",
]  # fmt: skip
HF_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"]
WORDS = (
    "the a cat dog sat on mat red blue quick brown fox jumps over lazy model assistant user "
    "hello world how are you today I am fine thanks what is where and answer question terse"
).split()


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + rng.choice(".?!")
        for _ in range(n)
    ]


def _train_sp(prefix, **overrides) -> str:
    # identity normalization, no dummy prefix and byte fallback make the model
    # lossless (like Llama 2 / Gemma); "\n" is absent from the corpus so it is
    # always its own byte piece.
    options = dict(
        model_type="bpe", vocab_size=400, hard_vocab_limit=False, user_defined_symbols=CHAT_TOKENS,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, bos_piece="<bos>", eos_piece="<eos>", pad_piece="<pad>",
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    options.update(overrides)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_prefix=str(prefix), **options)
    return f"{prefix}.model"


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return _train_sp(tmp_path_factory.mktemp("sp") / "tokenizer")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tok = RawHFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # as in Llama 3 / Qwen 2.5
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=HF_SPECIALS + CHAT_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(_corpus(), trainer)
    directory = tmp_path_factory.mktemp("hf")
    tok.save(str(directory / "tokenizer.json"))
    # Both spellings tokenizer_config.json uses: a plain string and an AddedToken dict.
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"content": "<|end_of_text|>", "special": True},
        "pad_token": "<|finetune_right_pad_id|>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def sp_tok(sp_path):
    return SentencePieceTokenizer(sp_path)


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return HFTokenizer(hf_dir)


@pytest.fixture(params=["sp", "hf"])
def tok(request):
    return request.getfixturevalue(f"{request.param}_tok")


# ------------------------------------------------------------------ tokenizers


def test_load_tokenizer_picks_backend(sp_path, hf_dir):
    assert isinstance(load_tokenizer(sp_path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
    assert isinstance(load_tokenizer(hf_dir / "tokenizer.json"), HFTokenizer)
    # A json path reads the config files next to it.
    assert load_tokenizer(hf_dir / "tokenizer.json").bos_token == "<|begin_of_text|>"


ROUND_TRIP = ["The quick brown fox jumps over the lazy dog.", "  two  spaces\nand\ttabs\n\n", "héllo wörld 🙂", ""]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert len(offsets) == len(ids)
    assert all(0 <= s <= e <= len(text) for s, e in offsets)


def test_ascii_offsets_tile_the_text(tok):
    text = "Where is the cat?<|eot_id|>\nThe cat sat."
    ids, offsets = tok.encode_with_offsets(text)
    assert "".join(text[s:e] for s, e in offsets) == text
    eot = tok.token_to_id("<|eot_id|>")
    assert offsets[ids.index(eot)] == (17, 27)


def test_special_ids(sp_tok, hf_tok, hf_dir):
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (1, 2, 3)
    assert (sp_tok.bos_token, sp_tok.eos_token) == ("<bos>", "<eos>")
    assert sp_tok.vocab_size == 400
    expected = [hf_tok.token_to_id(t) for t in HF_SPECIALS]
    assert [hf_tok.bos_id, hf_tok.eos_id, hf_tok.pad_id] == expected
    assert (hf_tok.bos_token, hf_tok.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert hf_tok.vocab_size == RawHFTokenizer.from_file(str(hf_dir / "tokenizer.json")).get_vocab_size()


@pytest.mark.parametrize("special", CHAT_TOKENS)
def test_special_tokens_in_text_become_single_ids(tok, special):
    special_id = tok.token_to_id(special)
    assert tok.encode(special) == [special_id]
    ids = tok.encode(f"Hello{special}world {special}")
    assert ids.count(special_id) == 2
    assert tok.decode(ids) == f"Hello{special}world {special}"


def test_encode_add_bos(tok):
    assert tok.encode("hi", add_bos=True) == [tok.bos_id, *tok.encode("hi")]


def test_decode_skip_special(tok):
    ids = [tok.bos_id, *tok.encode("<|im_start|>user\nhi<|im_end|>"), tok.eos_id]
    assert tok.decode(ids, skip_special=True) == "user\nhi"
    assert tok.decode(ids) == f"{tok.bos_token}<|im_start|>user\nhi<|im_end|>{tok.eos_token}"


def test_ids_past_the_vocabulary_decode_to_nothing(tok):
    """A model's padded embedding rows can be sampled; both tokenizers drop those ids (HF `tokenizers` does)."""
    ids = tok.encode("hi there")
    assert tok.decode([*ids, tok.vocab_size, tok.vocab_size + 5000]) == tok.decode(ids) == "hi there"


def test_token_to_id_error_names_token_and_file(tok):
    with pytest.raises(KeyError, match=r"<\|nope\|>") as info:
        tok.token_to_id("<|nope|>")
    assert str(tok.path) in str(info.value)


def test_missing_specials_are_none(tmp_path, hf_dir):
    sp = SentencePieceTokenizer(_train_sp(tmp_path / "nopad", model_type="unigram", pad_id=-1, vocab_size=350))
    assert sp.pad_id is None and sp.bos_id == 1
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    bare = HFTokenizer(tmp_path / "bare")
    assert (bare.bos_id, bare.eos_id, bare.pad_id, bare.bos_token) == (None, None, None, None)
    with pytest.raises(ValueError, match="no bos"):
        bare.encode("hi", add_bos=True)
    explicit = HFTokenizer(tmp_path / "bare", bos_token="<|begin_of_text|>")
    assert explicit.bos_id == explicit.token_to_id("<|begin_of_text|>")


def test_special_tokens_map_fallback(tmp_path, hf_dir):
    (tmp_path / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": {"content": "<|eot_id|>"}})
    )
    tok = HFTokenizer(tmp_path)
    assert (tok.bos_token, tok.eos_token, tok.pad_id) == ("<|begin_of_text|>", "<|eot_id|>", None)


def test_configured_token_missing_from_vocab(tmp_path, hf_dir):
    (tmp_path / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|missing|>"}))
    with pytest.raises(KeyError, match=r"<\|missing\|>.*tokenizer_config\.json"):
        HFTokenizer(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="vocab.txt"):
        load_tokenizer(tmp_path / "vocab.txt")


def test_transformers_fast_tokenizer_agrees(hf_dir, hf_tok):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    for text in ["The cat sat on the mat.", "<|im_start|>user\nhéllo 🙂<|im_end|>\n", "  a\n\nb  "]:
        ids = reference.encode(text, add_special_tokens=False)
        assert hf_tok.encode(text) == ids
        assert hf_tok.decode(ids) == reference.decode(ids)


# ------------------------------------------------------------------ chat templates

SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATION = [
    {"role": "user", "content": "  Where is the cat?\n"},  # strip()ped by llama3 and gemma only
    {"role": "assistant", "content": "The cat sat on the mat."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "The dog is lazy."},
]
# Hand-written renderings of [SYSTEM, *CONVERSATION]; {bos} is the tokenizer's bos string.
EXPECTED = {
    "llama3": (
        "{bos}<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhere is the cat?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThe cat sat on the mat.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd the dog?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThe dog is lazy.<|eot_id|>"
    ),
    "chatml": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\n  Where is the cat?\n<|im_end|>\n"
        "<|im_start|>assistant\nThe cat sat on the mat.<|im_end|>\n"
        "<|im_start|>user\nAnd the dog?<|im_end|>\n"
        "<|im_start|>assistant\nThe dog is lazy.<|im_end|>\n"
    ),
    "gemma": (
        "{bos}<start_of_turn>user\nYou are terse.\n\nWhere is the cat?<end_of_turn>\n"
        "<start_of_turn>model\nThe cat sat on the mat.<end_of_turn>\n"
        "<start_of_turn>user\nAnd the dog?<end_of_turn>\n"
        "<start_of_turn>model\nThe dog is lazy.<end_of_turn>\n"
    ),
}
EXPECTED["qwen2.5"] = EXPECTED["chatml"]  # a system message is given, so no default
GENERATION_PROMPT = {
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "chatml": "<|im_start|>assistant\n",
    "qwen2.5": "<|im_start|>assistant\n",
    "gemma": "<start_of_turn>model\n",
}


def _expected_ids(tok, text):
    # The bos is prepended as an id: SentencePiece never parses control symbols in text.
    if tok.bos_token and text.startswith(tok.bos_token):
        return tok.encode(text[len(tok.bos_token) :], add_bos=True)
    return tok.encode(text)


def _masked_text(tok, enc):
    return tok.decode([i for i, m in zip(enc.ids, enc.assistant_mask, strict=True) if m])


def test_template_names():
    assert set(CHAT_TEMPLATES) == {"llama3", "llama3.1", "chatml", "qwen2.5", "qwen3", "gemma"}
    assert [end_of_turn_token(t) for t in ("llama3", "chatml", "qwen2.5", "gemma")] == [
        "<|eot_id|>", "<|im_end|>", "<|im_end|>", "<end_of_turn>",
    ]  # fmt: skip


# The "\n" chatml, Qwen and Gemma write after the end of turn is in the mask (open-instruct / TRL convention).
AFTER_EOT = {"llama3": "", "chatml": "\n", "qwen2.5": "\n", "gemma": "\n"}


@pytest.mark.parametrize("template", list(EXPECTED))
def test_render_two_turns(tok, template):
    enc = render_chat(tok, [SYSTEM, *CONVERSATION], template=template)
    expected = EXPECTED[template].format(bos=tok.bos_token)
    assert enc.text == expected
    assert enc.ids == _expected_ids(tok, expected)
    if isinstance(tok, HFTokenizer):  # HF parses the bos string in text too
        assert enc.ids == tok.encode(expected)
    eot = end_of_turn_token(template) + AFTER_EOT[template]
    assert _masked_text(tok, enc) == f"The cat sat on the mat.{eot}The dog is lazy.{eot}"
    assert not enc.assistant_mask[0]  # bos or header
    assert enc.assistant_mask[-1]


@pytest.mark.parametrize("template", list(EXPECTED))
def test_generation_prompt(tok, template):
    messages = [SYSTEM, *CONVERSATION[:3]]
    enc = render_chat(tok, messages, template=template, add_generation_prompt=True)
    expected = EXPECTED[template].format(bos=tok.bos_token)
    expected = expected[: expected.index("The dog is lazy.")]  # ends with the assistant header
    assert expected.endswith(GENERATION_PROMPT[template])
    assert enc.text == expected
    assert enc.ids == _expected_ids(tok, expected)
    assert _masked_text(tok, enc) == f"The cat sat on the mat.{end_of_turn_token(template)}{AFTER_EOT[template]}"
    without = render_chat(tok, messages, template=template)
    assert enc.text == without.text + GENERATION_PROMPT[template]


@pytest.mark.parametrize("template", ["llama3", "gemma"])
def test_add_bos_false(tok, template):
    enc = render_chat(tok, CONVERSATION, template=template, add_bos=False)
    assert not enc.text.startswith(tok.bos_token)
    assert enc.ids == tok.encode(enc.text)


def test_chatml_ignores_bos(tok):
    assert render_chat(tok, CONVERSATION, template="chatml").text.startswith("<|im_start|>user\n")


def test_qwen25_inserts_default_system(tok):
    enc = render_chat(tok, CONVERSATION[:1], template="qwen2.5", add_generation_prompt=True)
    assert enc.text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n  Where is the cat?\n<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not any(enc.assistant_mask)
    assert render_chat(tok, CONVERSATION[:1], template="chatml").text.startswith("<|im_start|>user")


def test_gemma_without_system(tok):
    enc = render_chat(tok, CONVERSATION[:2], template="gemma")
    assert enc.text == (
        f"{tok.bos_token}<start_of_turn>user\nWhere is the cat?<end_of_turn>\n"
        "<start_of_turn>model\nThe cat sat on the mat.<end_of_turn>\n"
    )
    with pytest.raises(ValueError, match="system message needs a following user"):
        render_chat(tok, [SYSTEM], template="gemma")


@pytest.mark.parametrize("template", list(EXPECTED))
def test_mask_with_multibyte_and_special_boundaries(tok, template):
    # Byte-fallback / byte-level pieces of multi-byte chars sit right at region edges.
    answer = "é🙂 ok ü"
    enc = render_chat(tok, [{"role": "user", "content": "ünï?"}, {"role": "assistant", "content": answer}],
                      template=template)  # fmt: skip
    assert _masked_text(tok, enc) == answer + end_of_turn_token(template) + AFTER_EOT[template]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "empty"),
        ([{"role": "tool", "content": "x"}], "message 0: unknown role 'tool'"),
        ([{"role": "user", "content": ["x"]}], r"message 0 \(user\): content must be a str, got list"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "message 1: a system message"),
        ([{"role": "assistant", "content": "a"}], "message 0: expected role 'user', got 'assistant'"),
        (
            [SYSTEM, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "message 2: expected role 'assistant', got 'user'",
        ),
        (["hi"], "message 0: expected a dict"),
    ],
)  # fmt: skip
def test_validation_errors(sp_tok, messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(sp_tok, messages, template="chatml")


def test_unknown_template_lists_valid_ones(sp_tok):
    with pytest.raises(ValueError, match=r"unknown chat template 'vicuna'.*llama3, llama3\.1, chatml, qwen2\.5"):
        render_chat(sp_tok, CONVERSATION, template="vicuna")
    with pytest.raises(ValueError, match="valid templates"):
        end_of_turn_token("vicuna")


@pytest.fixture(scope="module")
def word_level_path(tmp_path_factory):
    """A tokenizer with llama3's tokens as added tokens, chatml's only as plain
    vocab entries (so text containing them is split), no gemma tokens, no bos."""
    vocab = {"[UNK]": 0, "hi": 1, "<|im_start|>": 2, "<|im_end|>": 3}
    tok = RawHFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    path = tmp_path_factory.mktemp("wordlevel") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_template_token_errors(word_level_path):
    tok = load_tokenizer(word_level_path)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"'gemma' needs special token '<start_of_turn>'.*wordlevel"):
        render_chat(tok, messages, template="gemma")
    with pytest.raises(ValueError, match=r"'chatml': '<\|im_start\|>' is in .* not encoded as the single id 2"):
        render_chat(tok, messages, template="chatml")
    with pytest.raises(ValueError, match="needs a bos token"):
        render_chat(tok, messages, template="llama3")
    enc = render_chat(tok, messages, template="llama3", add_bos=False)
    assert enc.ids[0] == tok.token_to_id("<|start_header_id|>")


# Text-only versions of the official Jinja templates, with {% generation %}
# around what we expect to be masked, rendered by transformers independently.
HF_JINJA = {
    "llama3": (
        "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "qwen2.5": (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
        "You are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{% for message in messages %}{% if message.role != 'system' %}"
        "{{ '<|im_start|>' + message.role + '\n' }}"
        "{% if message.role == 'assistant' %}"
        "{% generation %}{{ message.content + '<|im_end|>\n' }}{% endgeneration %}"
        "{% else %}{{ message.content + '<|im_end|>\n' }}{% endif %}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
        "{% if role == 'model' %}"
        "{% generation %}{{ message['content'] | trim + '<end_of_turn>\n' }}{% endgeneration %}"
        "{% else %}{{ message['content'] | trim + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
}


@pytest.mark.parametrize("template", list(HF_JINJA))
@pytest.mark.parametrize("system", [True, False])
def test_matches_transformers_apply_chat_template(hf_dir, hf_tok, template, system):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), bos_token=hf_tok.bos_token)
    messages = [SYSTEM, *CONVERSATION] if system else CONVERSATION
    ours = render_chat(hf_tok, messages, template=template)
    jinja = HF_JINJA[template]
    theirs = reference.apply_chat_template(
        messages, chat_template=jinja, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ours.text == reference.apply_chat_template(messages, chat_template=jinja, tokenize=False)
    assert ours.ids == list(theirs["input_ids"])
    assert ours.assistant_mask == [bool(m) for m in theirs["assistant_masks"]]
