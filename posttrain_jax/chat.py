"""Chat templates: the model's own (Jinja) or a built-in, with an assistant-only loss mask.

Which template (`resolve_template`): ``"auto"`` (the default everywhere)
uses the tokenizer's own Jinja template (``chat_template.jinja``, else
``chat_template`` in ``tokenizer_config.json``), rendered as transformers
renders it (`posttrain_jax.chat_jinja`), so ids equal
``AutoTokenizer.apply_chat_template(tokenize=True)``; a tokenizer without one
gets the built-in of its ``config.json`` model type (`MODEL_TYPE_TEMPLATES`),
else a one-line error naming the flag. A built-in name (`CHAT_TEMPLATES`) or
a path to a ``.jinja`` file picks one explicitly.

Mask convention. With a model's template: its ``{% generation %}`` blocks
when it has them (equal to transformers' ``return_assistant_tokens_mask``);
otherwise each assistant turn from the end of the prompt before it
(``add_generation_prompt=True``) to the end of the conversation cut after it,
i.e. the content, the end-of-turn token and whatever the template writes
after it (found by rendering prefixes; `chat_jinja.prefix_spans`). The
built-ins follow the same rule: True for each assistant message's content,
its end-of-turn token (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``)
*and* the ``\\n`` chatml, Qwen and Gemma write after it (as open-instruct and
TRL's training templates do), plus Qwen 3's think block on a final turn,
which the model writes after the generation prompt; False for the bos, the
role headers (the prompt supplies the assistant header at inference) and
every other message. A token is masked in when its character span overlaps
an assistant span. The whole conversation is rendered to one string and
encoded once, so ``ids`` equal encoding the rendered text.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING

from posttrain_jax import chat_jinja

if TYPE_CHECKING:
    from posttrain_jax.tokenizer import Offsets, Tokenizer

AUTO = "auto"
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Llama 3.1's template writes these in every system header.
LLAMA31_KNOWLEDGE_CUTOFF = "December 2023"
LLAMA31_DEFAULT_DATE = "26 Jul 2024"

Message = Mapping[str, str]
# A rendered conversation as (text, is_assistant_region) pieces.
Parts = list[tuple[str, bool]]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatEncoding:
    """A rendered conversation: token ids, loss mask, and the rendered text."""

    ids: list[int]
    assistant_mask: list[bool]
    text: str

    def __post_init__(self):
        if len(self.ids) != len(self.assistant_mask):
            raise ValueError(f"{len(self.ids)} ids but {len(self.assistant_mask)} mask entries")


# ------------------------------------------------------------------ built-ins


def _render_llama3(messages: Sequence[Message], add_generation_prompt: bool, **_) -> Parts:
    parts: Parts = []
    for m in messages:
        header, body = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", m["content"].strip() + "<|eot_id|>"
        parts += [(header, False), (body, m["role"] == "assistant")]
    if add_generation_prompt:
        parts.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return parts


def _render_llama31(messages: Sequence[Message], add_generation_prompt: bool, *,
                    date_string: str = LLAMA31_DEFAULT_DATE, **_) -> Parts:  # fmt: skip
    # Llama 3.1 always opens with a system header carrying the knowledge
    # cutoff and the date, then the (stripped) system message if any.
    system = messages[0]["content"].strip() if messages[0]["role"] == "system" else ""
    rest = messages[1:] if messages[0]["role"] == "system" else messages
    header = (f"<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: {LLAMA31_KNOWLEDGE_CUTOFF}\n"
              f"Today Date: {date_string}\n\n{system}<|eot_id|>")  # fmt: skip
    return [(header, False), *_render_llama3(rest, add_generation_prompt)]


def _render_chatml(messages: Sequence[Message], add_generation_prompt: bool, **_) -> Parts:
    parts: Parts = []
    for m in messages:
        parts += [(f"<|im_start|>{m['role']}\n", False), (m["content"] + "<|im_end|>\n", m["role"] == "assistant")]
    if add_generation_prompt:
        parts.append(("<|im_start|>assistant\n", False))
    return parts


def _render_qwen25(messages: Sequence[Message], add_generation_prompt: bool, **_) -> Parts:
    # Qwen2.5's official template injects this system prompt when none is given.
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": QWEN25_DEFAULT_SYSTEM}, *messages]
    return _render_chatml(messages, add_generation_prompt)


def _split_reasoning(message: Message) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message, as Qwen 3's template splits it."""
    content = message["content"]
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if "</think>" in content:  # reasoning before the first </think>, the answer after the last
        pieces = content.split("</think>")
        return pieces[0].rstrip("\n").split("<think>")[-1].lstrip("\n"), pieces[-1].lstrip("\n")
    return "", content


def _render_qwen3(messages: Sequence[Message], add_generation_prompt: bool, *,
                  enable_thinking: bool = True, **_) -> Parts:  # fmt: skip
    # Qwen 3's official conventions (text only): no default system prompt;
    # assistant turns after the last user turn keep their reasoning in a
    # <think> block, and the final one always has one (empty when there is no
    # reasoning); earlier turns' reasoning is dropped. With thinking off the
    # generation prompt itself closes an empty think block.
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    parts: Parts = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            parts += [(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False)]
            continue
        reasoning, answer = _split_reasoning(m)
        parts.append(("<|im_start|>assistant\n", False))
        if i > last_user and (i == len(messages) - 1 or reasoning):
            answer = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{answer.lstrip(chr(10))}"
        parts.append((answer + "<|im_end|>\n", True))
    if add_generation_prompt:
        parts.append(("<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n"), False))
    return parts


def _render_gemma(messages: Sequence[Message], add_generation_prompt: bool, **_) -> Parts:
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
        body = (prefix if i == 0 else "") + m["content"].strip() + "<end_of_turn>\n"
        parts += [(f"<start_of_turn>{role}\n", False), (body, m["role"] == "assistant")]
    if add_generation_prompt:
        parts.append(("<start_of_turn>model\n", False))
    return parts


@dataclass(frozen=True)
class _Builtin:
    render: Callable[..., Parts]
    special_tokens: tuple[str, ...]  # must each be a single, text-matchable id
    end_of_turn: str
    uses_bos: bool


_LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_BUILTINS: dict[str, _Builtin] = {
    "llama3": _Builtin(_render_llama3, _LLAMA3_TOKENS, "<|eot_id|>", uses_bos=True),
    "llama3.1": _Builtin(_render_llama31, _LLAMA3_TOKENS, "<|eot_id|>", uses_bos=True),
    "chatml": _Builtin(_render_chatml, _CHATML_TOKENS, "<|im_end|>", uses_bos=False),
    "qwen2.5": _Builtin(_render_qwen25, _CHATML_TOKENS, "<|im_end|>", uses_bos=False),
    "qwen3": _Builtin(_render_qwen3, _CHATML_TOKENS, "<|im_end|>", uses_bos=False),
    "gemma": _Builtin(_render_gemma, ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>", uses_bos=True),
}
CHAT_TEMPLATES: tuple[str, ...] = tuple(_BUILTINS)
# ChatML as a Jinja template with {% generation %} markers (mask as the
# chatml built-in): shipped next to tokenizers trained here (the quickstart's
# SentencePiece model), so "auto" finds a template of their own.
CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>\\n' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The built-in used for a tokenizer without a template of its own, by the
# `model_type` of the config.json next to it.
MODEL_TYPE_TEMPLATES = {"llama": "llama3.1", "qwen2": "qwen2.5", "qwen3": "qwen3", "gemma3": "gemma",
                        "gemma3_text": "gemma", "gemma2": "gemma", "gemma": "gemma"}  # fmt: skip


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


# ------------------------------------------------------------------ resolved templates


def _overlap_mask(offsets: Offsets, regions: Sequence[tuple[int, int]], n_chars: int) -> list[bool]:
    """True for each token whose char span overlaps one of `regions`."""
    inside = [False] * n_chars
    for start, end in regions:
        inside[start:end] = [True] * (end - start)
    prefix = [0, *accumulate(inside)]  # prefix[k] = assistant chars before k: O(1) overlap test
    mask = []
    for start, end in offsets:
        if end > start:
            mask.append(prefix[end] - prefix[start] > 0)
        else:  # zero-width span (e.g. a leading byte of a multi-byte char)
            mask.append(start < n_chars and inside[start])
    return mask


@dataclass
class ChatTemplate:
    """A resolved template: a built-in (`builtin`) or a Jinja source (`source`)."""

    name: str
    builtin: _Builtin | None = None
    source: str | None = None
    _probe: dict = field(default_factory=dict, repr=False)

    @property
    def is_jinja(self) -> bool:
        return self.source is not None

    def check_tokens(self, tokenizer: Tokenizer) -> None:
        """Built-ins: each special token the template writes is one text-matchable id of `tokenizer`."""
        if self.builtin is None:
            return
        checked = tokenizer.__dict__.setdefault("_checked_templates", set())
        if self.name in checked:
            return
        for token in self.builtin.special_tokens:
            try:
                token_id = tokenizer.token_to_id(token)
            except KeyError:
                raise ValueError(f"chat template {self.name!r} needs special token {token!r}, which "
                                 f"{tokenizer.path} does not have") from None  # fmt: skip
            if tokenizer.encode(token) != [token_id]:
                raise ValueError(
                    f"chat template {self.name!r}: {token!r} is in {tokenizer.path} but is not encoded as the single "
                    f"id {token_id} when it appears in text; it must be an added/special token (HF) or a "
                    "user_defined_symbol (SentencePiece)"
                )
        checked.add(self.name)

    def render_text(self, tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool,
                    **kwargs) -> tuple[str, list[tuple[int, int]]]:  # fmt: skip
        """(text, assistant character spans) of a Jinja template."""
        def render(msgs, gen):
            return chat_jinja.render_jinja(self.source, msgs, add_generation_prompt=gen,
                                           special_tokens=tokenizer.special_token_strings(), **kwargs)

        text, spans = render(messages, add_generation_prompt)
        if not chat_jinja.has_generation_blocks(self.source):
            spans = chat_jinja.prefix_spans(lambda m, g: render(m, g)[0], messages, text, add_generation_prompt)
        return text, spans

    def end_of_turn(self, tokenizer: Tokenizer) -> str:
        """The token string that ends an assistant turn (a sampler stop token)."""
        if self.builtin is not None:
            return self.builtin.end_of_turn
        return self._probe_tokens(tokenizer)[0]

    def special_tokens(self, tokenizer: Tokenizer) -> tuple[str, ...]:
        """The special token strings the template writes around messages."""
        if self.builtin is not None:
            return self.builtin.special_tokens
        return self._probe_tokens(tokenizer)[1]

    def _probe_tokens(self, tokenizer: Tokenizer) -> tuple[str, tuple[str, ...]]:
        # Render a one-turn probe; the first token after the assistant content
        # is the end of turn, and the special tokens around it are the markup.
        key = str(tokenizer.path)
        if key not in self._probe:
            content = "Probe."
            text, _ = self.render_text(tokenizer, [{"role": "user", "content": "Hi."},
                                                   {"role": "assistant", "content": content}], False)  # fmt: skip
            after = text[text.rindex(content) + len(content):]
            after_ids = tokenizer.encode(after)
            if not after_ids:
                raise ValueError(f"chat template {self.name!r} writes nothing after an assistant message, so it has "
                                 "no end-of-turn token to stop generation at")  # fmt: skip
            ids = tokenizer.encode(text)
            special = {tokenizer.id_to_token(i) for i in ids if tokenizer.decode([i], skip_special=True) == ""}
            self._probe[key] = (tokenizer.id_to_token(after_ids[0]), tuple(sorted(special)))
        return self._probe[key]


def _builtin(name: str) -> ChatTemplate:
    return ChatTemplate(name=name, builtin=_BUILTINS[name])


def _choices() -> str:
    return f"{AUTO!r} (the tokenizer's own), a .jinja file, or one of {', '.join(CHAT_TEMPLATES)}"


def resolve_template(tokenizer: Tokenizer, template: str = AUTO) -> ChatTemplate:
    """The template a name stands for with `tokenizer` (see the module docstring). Cached per tokenizer."""
    cache = tokenizer.__dict__.setdefault("_resolved_templates", {})
    if template in cache:
        return cache[template]
    if template in _BUILTINS:
        resolved = _builtin(template)
    elif template == AUTO:
        own = tokenizer.chat_template
        if own is not None:
            resolved = ChatTemplate(name=f"{tokenizer.path.parent}'s own", source=own)
        elif tokenizer.model_type in MODEL_TYPE_TEMPLATES:
            resolved = _builtin(MODEL_TYPE_TEMPLATES[tokenizer.model_type])
        else:
            raise ValueError(
                f"{tokenizer.path} has no chat template of its own (no chat_template.jinja or tokenizer_config.json "
                f"chat_template next to it) and no config.json model_type to infer one from; pass --chat-template "
                f"(or --config.chat_template=...) with one of {', '.join(CHAT_TEMPLATES)} or a .jinja file"
            )
    elif isinstance(template, str) and (template.endswith(".jinja") or os.path.isfile(template)):
        if not os.path.isfile(template):
            raise FileNotFoundError(f"chat template file not found: {template}")
        with open(template, encoding="utf-8") as f:
            resolved = ChatTemplate(name=template, source=f.read())
    else:
        raise ValueError(f"unknown chat template {template!r}; valid templates: {_choices()}")
    if resolved.is_jinja:
        chat_jinja.compile_template(resolved.source)  # a syntax error fails here, before any data
    cache[template] = resolved
    return resolved


def end_of_turn_token(template: str, tokenizer: Tokenizer | None = None) -> str:
    """The token string that ends a turn in `template` (a sampler stop token).
    `tokenizer` is needed for "auto" and Jinja templates."""
    if template in _BUILTINS:
        return _BUILTINS[template].end_of_turn
    if tokenizer is None:
        raise ValueError(f"unknown chat template {template!r} without a tokenizer; valid templates: {_choices()}")
    return resolve_template(tokenizer, template).end_of_turn(tokenizer)


def template_special_tokens(template: str, tokenizer: Tokenizer | None = None) -> tuple[str, ...]:
    """The special token strings `template` writes (turn and role-header
    delimiters, end of turn); each is a single id in a compatible tokenizer."""
    if template in _BUILTINS:
        return _BUILTINS[template].special_tokens
    if tokenizer is None:
        raise ValueError(f"unknown chat template {template!r} without a tokenizer; valid templates: {_choices()}")
    return resolve_template(tokenizer, template).special_tokens(tokenizer)


def _encode_jinja_text(tokenizer: Tokenizer, text: str) -> tuple[list[int], Offsets, int]:
    """(ids, offsets relative to `text`, ids prepended): a bos the template
    writes as text is prepended as an id when the tokenizer cannot parse it
    from text (SentencePiece control symbols)."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer.encode(bos) != [tokenizer.bos_id]:
        ids, offsets = tokenizer.encode_with_offsets(text[len(bos):])
        return [tokenizer.bos_id, *ids], [(0, len(bos)), *[(s + len(bos), e + len(bos)) for s, e in offsets]], 1
    ids, offsets = tokenizer.encode_with_offsets(text)
    return ids, offsets, 0


def _generation_mask(offsets: Offsets, spans: Sequence[tuple[int, int]]) -> list[bool]:
    # transformers' rule: a token is in when it overlaps a span (start < span end, end > span start).
    return [any(start < b and end > a for a, b in spans) for start, end in offsets]


def render_chat(tokenizer: Tokenizer, messages: Sequence[Message], *, template: str = AUTO,
                add_generation_prompt: bool = False, add_bos: bool = True, tools: Sequence[Mapping] | None = None,
                **template_kwargs) -> ChatEncoding:  # fmt: skip
    """Render `messages` with `template` (see `resolve_template`) and tokenize it.

    Returns ids, the assistant mask (see the module docstring) and the text.
    A model's Jinja template decides the bos itself (`add_bos` is ignored, as
    in transformers) and sees `tools` and `template_kwargs` (e.g.
    ``enable_thinking=False``); its ids equal
    ``apply_chat_template(messages, tokenize=True)``. Built-ins: those
    without a bos (chatml, qwen2.5, qwen3) ignore `add_bos`; the bos is
    prepended as an id (SentencePiece never matches control symbols in
    text), so ``ids == tokenizer.encode(text_after_bos, add_bos=True)``. The
    qwen3 built-in reads ``enable_thinking``, llama3.1 ``date_string``.
    Content is not escaped: special tokens written inside a message become
    special ids, as in HF. Raises ValueError naming the message for invalid
    conversations, the template for templates that refuse them.
    """
    resolved = resolve_template(tokenizer, template)
    validate_messages(messages)
    resolved.check_tokens(tokenizer)
    if resolved.is_jinja:
        text, spans = resolved.render_text(tokenizer, messages, add_generation_prompt, tools=tools,
                                           **template_kwargs)  # fmt: skip
        ids, offsets, _ = _encode_jinja_text(tokenizer, text)
        return ChatEncoding(ids=ids, assistant_mask=_generation_mask(offsets, spans), text=text)
    spec = resolved.builtin
    add_bos = add_bos and spec.uses_bos
    if add_bos and tokenizer.bos_id is None:
        raise ValueError(f"template {template!r} with add_bos=True needs a bos token, but {tokenizer.path} has none")
    parts = spec.render(messages, add_generation_prompt, **template_kwargs)
    regions, pos = [], 0
    for text, is_assistant in parts:
        if is_assistant:
            regions.append((pos, pos + len(text)))
        pos += len(text)
    body = "".join(text for text, _ in parts)
    ids, offsets = tokenizer.encode_with_offsets(body)
    mask = _overlap_mask(offsets, regions, len(body))
    if not add_bos:
        return ChatEncoding(ids=ids, assistant_mask=mask, text=body)
    return ChatEncoding(ids=[tokenizer.bos_id, *ids], assistant_mask=[False, *mask], text=tokenizer.bos_token + body)

