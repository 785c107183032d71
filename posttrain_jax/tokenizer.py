"""Tokenizers and chat-template rendering with an assistant-only loss mask.

Two tokenizer back ends share one small interface (`Tokenizer`):
`SentencePieceTokenizer` (a SentencePiece ``.model``) and `HFTokenizer` (a
Hugging Face ``tokenizer.json``). `load_tokenizer` picks one by file type.

`render_chat` turns a conversation into token ids for one of the built-in
templates (`CHAT_TEMPLATES`) plus an assistant mask.

Mask convention (the one used by open-instruct and TRL's assistant-only
loss): the mask is True for the tokens of each assistant message's content
*and* its end-of-turn token (``<|eot_id|>``, ``<|im_end|>``,
``<end_of_turn>``), so the model learns to stop. It is False for the bos
token, every role header (including the assistant's own header, which the
prompt supplies at inference time) and the ``\\n`` that follows an
end-of-turn token in chatml and gemma. The whole conversation is rendered to
one string and encoded once, so ``ids`` equal encoding the rendered text
(like HF ``apply_chat_template(tokenize=True)``); a token is masked in when
its character span overlaps an assistant region (a token straddling a
boundary, possible only if a tokenizer merges across it, is masked in).
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

Offsets = list[tuple[int, int]]


class Tokenizer(abc.ABC):
    """Common interface. Missing special tokens are ``None``, never ``-1``."""

    path: Path
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    @abc.abstractmethod
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Encode text; special tokens written literally become their single id."""

    @abc.abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        """Encode text (no bos) and return each token's (start, end) char span."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Decode ids to text, optionally dropping special tokens."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int:
        """Id of a token string; KeyError naming the token and file if absent."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """Token string of an id."""

    @property
    def bos_token(self) -> str | None:
        """The bos token string, or None if the tokenizer has no bos."""
        return None if self.bos_id is None else self.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        """The eos token string, or None if the tokenizer has no eos."""
        return None if self.eos_id is None else self.id_to_token(self.eos_id)

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        if not add_bos:
            return ids
        if self.bos_id is None:
            raise ValueError(f"add_bos=True but {self.path} defines no bos token")
        return [self.bos_id, *ids]

    def _missing(self, token: str) -> KeyError:
        return KeyError(f"token {token!r} is not in the vocabulary of {self.path}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``. Chat special tokens must be
    ``user_defined_symbols``: SentencePiece matches those in raw text, whereas
    control symbols (bos/eos/pad) are never matched in text."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        self.path = _existing_file(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path} is not a SentencePiece model: {e}") from e
        self.vocab_size = self._sp.get_piece_size()
        # SentencePiece reports a missing special token as -1.
        self.bos_id, self.eos_id, self.pad_id = (
            None if i < 0 else i for i in (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id())
        )
        # The Python API cannot tell user-defined pieces apart, so read the piece
        # types from the model proto. Both kinds count as "special" for
        # decode(skip_special=True), as chat tokens are declared user-defined.
        proto = pb.ModelProto.FromString(self._sp.serialized_model_proto())
        special_types = {pb.ModelProto.SentencePiece.CONTROL, pb.ModelProto.SentencePiece.USER_DEFINED}
        self._special_ids = frozenset(i for i, p in enumerate(proto.pieces) if p.type in special_types)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return self._with_bos(list(self._sp.encode(text)), add_bos)

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        # Offsets are character offsets into `text`. For a multi-byte character
        # split into byte-fallback pieces, all but the last piece are zero-width.
        out = self._sp.encode(text, out_type="offset_mapping")
        return list(out["ids"]), [(int(s), int(e)) for s, e in out["offsets"]]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            return self._sp.decode([i for i in ids if i not in self._special_ids])
        # SentencePiece silently drops control symbols (bos/eos/pad); write them
        # out like HF does so a decoded sequence hides nothing.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if self._sp.is_control(i):
                parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int:
        token_id = self._sp.piece_to_id(token)
        # piece_to_id maps unknown pieces to unk_id instead of failing.
        if self._sp.id_to_piece(token_id) != token:
            raise self._missing(token)
        return token_id

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


def _configured_special_tokens(directory: Path) -> dict[str, tuple[str, str]]:
    """Read bos/eos/pad token strings (and the file that set each) from
    tokenizer_config.json, falling back to special_tokens_map.json."""
    found: dict[str, tuple[str, str]] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = directory / name
        if not file.is_file():
            continue
        config = json.loads(file.read_text(encoding="utf-8"))
        for key in ("bos_token", "eos_token", "pad_token"):
            if key not in found and (token := config.get(key)) is not None:
                # Stored either as "<s>" or as an AddedToken dict {"content": "<s>", ...}.
                found[key] = (token["content"] if isinstance(token, Mapping) else token, str(file))
    return found


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (path to the file or its directory).

    bos/eos/pad token strings come from the keyword arguments, else from
    ``tokenizer_config.json`` / ``special_tokens_map.json`` next to the file.
    """

    def __init__(self, path: str | Path, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None):  # fmt: skip
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        self.path = _existing_file(path / "tokenizer.json" if path.is_dir() else path)
        try:
            self._tok = _HFTokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ValueError(f"{self.path} is not a Hugging Face tokenizer.json: {e}") from e
        # Padding/truncation saved in tokenizer.json would silently change encode().
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

        # Explicit arguments win over the config files next to tokenizer.json.
        found = _configured_special_tokens(self.path.parent)
        given = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        found.update({key: (token, "argument") for key, token in given.items() if token is not None})
        self.bos_id, self.eos_id, self.pad_id = (
            self._configured_id(key, *found[key]) if key in found else None for key in given
        )

    def _configured_id(self, key: str, token: str, source: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{key} {token!r} (from {source}) is not in the vocabulary of {self.path}")
        return token_id

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return self._with_bos(self.encode_with_offsets(text)[0], add_bos)

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        # add_special_tokens=False: bos is our decision (add_bos), not the
        # post-processor's. Added tokens in the text are still matched.
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise self._missing(token)
        return token_id

    def id_to_token(self, token_id: int) -> str:
        token = self._tok.id_to_token(int(token_id))
        if token is None:
            raise IndexError(f"id {token_id} is out of range for {self.path} (vocab_size={self.vocab_size})")
        return token


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``.model`` file (SentencePiece), a ``tokenizer.json`` (HF), or a
    directory containing ``tokenizer.json`` (preferred) or ``tokenizer.model``."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path)
        if (path / "tokenizer.model").is_file():
            return SentencePieceTokenizer(path / "tokenizer.model")
        raise FileNotFoundError(f"{path} contains neither tokenizer.json nor tokenizer.model")
    _existing_file(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    raise ValueError(
        f"cannot tell the tokenizer type of {path}: expected a SentencePiece .model file, "
        "a tokenizer.json, or a directory containing one"
    )


# ---------------------------------------------------------------- chat templates

QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

Message = Mapping[str, str]
# A rendered conversation as (text, is_assistant_region) pieces.
Parts = list[tuple[str, bool]]


@dataclass(frozen=True)
class ChatEncoding:
    """A rendered conversation: token ids, loss mask, and the rendered text."""

    ids: list[int]
    assistant_mask: list[bool]
    text: str

    def __post_init__(self):
        if len(self.ids) != len(self.assistant_mask):
            raise ValueError(f"{len(self.ids)} ids but {len(self.assistant_mask)} mask entries")


def _render_llama3(messages: Sequence[Message], add_generation_prompt: bool) -> Parts:
    parts: Parts = []
    for m in messages:
        header, body = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", m["content"].strip() + "<|eot_id|>"
        parts += [(header, False), (body, m["role"] == "assistant")]
    if add_generation_prompt:
        parts.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return parts


def _render_chatml(messages: Sequence[Message], add_generation_prompt: bool) -> Parts:
    parts: Parts = []
    for m in messages:
        header, body = f"<|im_start|>{m['role']}\n", m["content"] + "<|im_end|>"
        parts += [(header, False), (body, m["role"] == "assistant"), ("\n", False)]
    if add_generation_prompt:
        parts.append(("<|im_start|>assistant\n", False))
    return parts


def _render_qwen25(messages: Sequence[Message], add_generation_prompt: bool) -> Parts:
    # Qwen2.5's official template injects this system prompt when none is given.
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": QWEN25_DEFAULT_SYSTEM}, *messages]
    return _render_chatml(messages, add_generation_prompt)


def _render_gemma(messages: Sequence[Message], add_generation_prompt: bool) -> Parts:
    # Gemma has no system turn: Gemma 3 prepends the system text (untrimmed,
    # plus a blank line) to the first user turn.
    prefix = ""
    if messages[0]["role"] == "system":
        if len(messages) == 1:
            raise ValueError("gemma template: a system message needs a following user message to attach to")
        prefix, messages = messages[0]["content"] + "\n\n", messages[1:]
    parts: Parts = []
    for i, m in enumerate(messages):
        role = "model" if m["role"] == "assistant" else m["role"]
        body = (prefix if i == 0 else "") + m["content"].strip() + "<end_of_turn>"
        parts += [(f"<start_of_turn>{role}\n", False), (body, m["role"] == "assistant"), ("\n", False)]
    if add_generation_prompt:
        parts.append(("<start_of_turn>model\n", False))
    return parts


@dataclass(frozen=True)
class _Template:
    render: Callable[[Sequence[Message], bool], Parts]
    special_tokens: tuple[str, ...]  # must each be a single, text-matchable id
    end_of_turn: str
    uses_bos: bool


_LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_TEMPLATES: dict[str, _Template] = {
    "llama3": _Template(_render_llama3, _LLAMA3_TOKENS, "<|eot_id|>", uses_bos=True),
    "chatml": _Template(_render_chatml, _CHATML_TOKENS, "<|im_end|>", uses_bos=False),
    "qwen2.5": _Template(_render_qwen25, _CHATML_TOKENS, "<|im_end|>", uses_bos=False),
    "gemma": _Template(_render_gemma, ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>", uses_bos=True),
}
CHAT_TEMPLATES: tuple[str, ...] = tuple(_TEMPLATES)
ROLES = ("system", "user", "assistant")


def _get_template(name: str) -> _Template:
    if name not in _TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; valid templates: {', '.join(CHAT_TEMPLATES)}")
    return _TEMPLATES[name]


def end_of_turn_token(template: str) -> str:
    """The token string that ends a turn in `template` (a sampler stop token)."""
    return _get_template(template).end_of_turn


def template_special_tokens(template: str) -> tuple[str, ...]:
    """The special token strings `template` writes (turn and role-header
    delimiters, end of turn); each is a single id in a compatible tokenizer."""
    return _get_template(template).special_tokens


def validate_messages(messages: Sequence[Message]) -> None:
    """Raise ValueError (naming the message index) unless `messages` is an
    optional leading system message followed by alternating user/assistant
    turns starting with user, each with str content."""
    if not messages:
        raise ValueError("messages is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} ({role}): content must be a str, got {type(m.get('content')).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message is only allowed as the first message")
    start = 1 if messages[0]["role"] == "system" else 0
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            raise ValueError(
                f"message {i}: expected role {expected!r}, got {messages[i]['role']!r} (after an optional "
                "leading system message, roles must alternate user, assistant, user, ...)"
            )


def _check_template_tokens(tokenizer: Tokenizer, name: str, tokens: Iterable[str]) -> None:
    # Once per tokenizer and template: a data pre-pass renders every row.
    checked = tokenizer.__dict__.setdefault("_checked_templates", set())
    if name in checked:
        return
    for token in tokens:
        try:
            token_id = tokenizer.token_to_id(token)
        except KeyError:
            raise ValueError(
                f"chat template {name!r} needs special token {token!r}, which {tokenizer.path} does not have"
            ) from None
        if tokenizer.encode(token) != [token_id]:
            raise ValueError(
                f"chat template {name!r}: {token!r} is in {tokenizer.path} but is not encoded as the single id "
                f"{token_id} when it appears in text; it must be an added/special token (HF) or a "
                "user_defined_symbol (SentencePiece)"
            )
    checked.add(name)


def _join(parts: Parts) -> tuple[str, list[tuple[int, int]]]:
    """Concatenate parts, returning the text and the char spans of assistant parts."""
    regions, pos = [], 0
    for text, is_assistant in parts:
        if is_assistant:
            regions.append((pos, pos + len(text)))
        pos += len(text)
    return "".join(text for text, _ in parts), regions


def _overlap_mask(offsets: Offsets, regions: list[tuple[int, int]], n_chars: int) -> list[bool]:
    """True for each token whose char span overlaps one of `regions`."""
    inside = [False] * n_chars
    for start, end in regions:
        inside[start:end] = [True] * (end - start)
    # prefix[k] = number of assistant chars before position k: O(1) overlap test.
    prefix = [0, *accumulate(inside)]
    mask = []
    for start, end in offsets:
        if end > start:
            mask.append(prefix[end] - prefix[start] > 0)
        else:  # zero-width span (e.g. a leading byte of a multi-byte char)
            mask.append(start < n_chars and inside[start])
    return mask


def render_chat(tokenizer: Tokenizer, messages: Sequence[Message], *, template: str,
                add_generation_prompt: bool = False, add_bos: bool = True) -> ChatEncoding:  # fmt: skip
    """Render `messages` with a built-in `template` and tokenize it.

    Returns ids, the assistant mask (see the module docstring) and the text.
    Templates without a bos (chatml, qwen2.5) ignore `add_bos`. The bos is
    prepended as an id rather than parsed from the text, because SentencePiece
    never matches control symbols in text; so ``ids ==
    tokenizer.encode(text_after_bos, add_bos=True)``, which for HF tokenizers
    also equals ``tokenizer.encode(text)``. Content is not escaped: special
    tokens written inside a message become special ids, as in HF.
    """
    spec = _get_template(template)
    validate_messages(messages)
    _check_template_tokens(tokenizer, template, spec.special_tokens)
    add_bos = add_bos and spec.uses_bos
    if add_bos and tokenizer.bos_id is None:
        raise ValueError(f"template {template!r} with add_bos=True needs a bos token, but {tokenizer.path} has none")
    body, regions = _join(spec.render(messages, add_generation_prompt))
    ids, offsets = tokenizer.encode_with_offsets(body)
    mask = _overlap_mask(offsets, regions, len(body))
    if not add_bos:
        return ChatEncoding(ids=ids, assistant_mask=mask, text=body)
    return ChatEncoding(ids=[tokenizer.bos_id, *ids], assistant_mask=[False, *mask], text=tokenizer.bos_token + body)
