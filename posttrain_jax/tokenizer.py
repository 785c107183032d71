"""Tokenizers and chat-template rendering with an assistant-only loss mask.

Two tokenizer back ends share one small interface (`Tokenizer`):
`SentencePieceTokenizer` (a SentencePiece ``.model``) and `HFTokenizer` (a
Hugging Face ``tokenizer.json``). `load_tokenizer` picks one by file type.

Each tokenizer also carries what the files next to it say about chat:
its own Jinja ``chat_template`` (``chat_template.jinja``, else
``tokenizer_config.json``), the ``model_type`` of a ``config.json``, and the
special token strings a template sees. `render_chat` (in
`posttrain_jax.chat`, re-exported here) renders conversations with it.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterable, Mapping
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
    def chat_template(self) -> str | None:
        """The tokenizer's own Jinja chat template, or None (read lazily from the files next to it)."""
        if "_chat_files" not in self.__dict__:
            self._chat_files = _read_chat_files(self.path.parent)
        return self._chat_files[0]

    @property
    def model_type(self) -> str | None:
        """``model_type`` of the ``config.json`` next to the tokenizer, or None."""
        if "_chat_files" not in self.__dict__:
            self._chat_files = _read_chat_files(self.path.parent)
        return self._chat_files[1]

    def special_token_strings(self) -> dict[str, str]:
        """bos/eos/pad/unk token strings a chat template sees (as transformers' special_tokens_map)."""
        out = {"bos_token": self.bos_token, "eos_token": self.eos_token,
               "pad_token": None if self.pad_id is None else self.id_to_token(self.pad_id)}
        unk = getattr(self, "unk_token", None)
        if unk:
            out["unk_token"] = unk
        return {k: v for k, v in out.items() if v is not None}

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


def _read_chat_files(directory: Path) -> tuple[str | None, str | None]:
    """(own chat template, config.json model_type) from a tokenizer's directory.

    Like transformers, ``chat_template.jinja`` wins over ``chat_template`` in
    ``tokenizer_config.json``; a list of named templates gives its "default".
    """
    template = None
    jinja_file, config_file = directory / "chat_template.jinja", directory / "tokenizer_config.json"
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    elif config_file.is_file():
        value = _read_json(config_file).get("chat_template")
        if isinstance(value, list):
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
            if "default" not in named:
                raise ValueError(f"{config_file}: chat_template lists named templates {sorted(named)} but none "
                                 "is named 'default'")  # fmt: skip
            value = named["default"]
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{config_file}: chat_template must be a string, got {type(value).__name__}")
        template = value
    model_type = None
    if (directory / "config.json").is_file():
        model_type = _read_json(directory / "config.json").get("model_type")
    return template, model_type


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return value if isinstance(value, dict) else {}


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
        # Ids past the vocabulary (a model's padded embedding rows, which a sampler can draw) decode to
        # nothing, as Hugging Face `tokenizers` does; SentencePiece would raise OUT_OF_RANGE.
        size = self._sp.get_piece_size()
        ids = [i for i in (int(i) for i in ids) if 0 <= i < size]
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


# Chat templates live in posttrain_jax.chat; re-exported here, where callers have always found them.
from posttrain_jax.chat import (  # noqa: E402
    AUTO,
    CHAT_TEMPLATES,
    MODEL_TYPE_TEMPLATES,
    QWEN25_DEFAULT_SYSTEM,
    ROLES,
    ChatEncoding,
    ChatTemplate,
    end_of_turn_token,
    render_chat,
    resolve_template,
    template_special_tokens,
    validate_messages,
)
