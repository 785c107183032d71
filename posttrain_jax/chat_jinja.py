"""A model's own Jinja chat template, rendered the way transformers renders it.

The environment matches `transformers.utils.chat_template_utils` (read
there, written here): jinja2's ImmutableSandboxedEnvironment (templates
from the Hub are untrusted code) with ``trim_blocks`` and ``lstrip_blocks``,
the ``loopcontrols`` extension, a ``tojson`` filter that does not escape HTML
and keeps non-ASCII, and the globals ``raise_exception`` and
``strftime_now``. The template sees ``messages``, ``tools``, ``documents``,
``add_generation_prompt``, the tokenizer's special token strings
(``bos_token``, ``eos_token``, ...) and any extra keyword (``enable_thinking``,
``date_string``, ...). Messages are passed like transformers passes them:
keys whose value is None are dropped, and reasoning given as ``thinking`` or
``reasoning`` is also visible as ``reasoning_content``.

``{% generation %} ... {% endgeneration %}`` blocks are recorded as
character spans of the rendered text (transformers' AssistantTracker
semantics), which become `return_assistant_tokens_mask`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

Span = tuple[int, int]

# (text rendered so far, spans found so far) of the render in progress.
_TRACKING: ContextVar[tuple[list[str], list[Span]] | None] = ContextVar("posttrain_jax_generation", default=None)
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its ``raise_exception``) or failed to render."""


@lru_cache(maxsize=64)
def compile_template(source: str):
    """The compiled jinja2 template of `source` (cached by source text)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationSpans(Extension):
        """``{% generation %}`` records where its body lands in the output."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_record", []), [], [], body).set_lineno(lineno)

        def _record(self, caller) -> str:
            text = caller()
            tracking = _TRACKING.get()
            if tracking is not None:
                blocks, spans = tracking
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationSpans, loopcontrols])  # fmt: skip
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}): {e.message}") from e


def has_generation_blocks(source: str) -> bool:
    """Whether the template marks assistant output with ``{% generation %}``."""
    import re

    return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None


def _plain(value: Any) -> Any:
    # Only JSON-like data reaches the sandbox (as transformers does: no objects with methods).
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for base in (bool, str, int, float):  # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, base):
            return base(value)
    return f"<{type(value).__name__}>"


def template_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Messages as transformers hands them to a template (None values dropped, reasoning aliased)."""
    out = []
    for message in messages:
        message = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_jinja(source: str, messages: Sequence[Mapping], *, add_generation_prompt: bool,
                 special_tokens: Mapping[str, str], tools: Sequence[Mapping] | None = None,
                 **kwargs) -> tuple[str, list[Span]]:  # fmt: skip
    """(rendered text, character spans of ``{% generation %}`` blocks).

    Raises ChatTemplateError with the template's own message when the
    template calls ``raise_exception`` (e.g. roles that do not alternate).
    """
    import jinja2

    template = compile_template(source)
    context = {**dict(special_tokens), **_plain(kwargs)}
    context.update(messages=template_messages(messages), tools=_plain(tools), documents=None,
                   add_generation_prompt=add_generation_prompt)
    blocks: list[str] = []
    spans: list[Span] = []
    token = _TRACKING.set((blocks, spans))
    try:
        for block in template.generate(**context):
            blocks.append(block)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the conversation: {e}") from e
    finally:
        _TRACKING.reset(token)
    return "".join(blocks), spans


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _changed_span(full: str, other: str) -> Span:
    """The span of `full` that differs from `other` (the rest is a shared prefix and suffix)."""
    prefix = _common_prefix(full, other)
    limit = min(len(full), len(other)) - prefix
    suffix = 0
    while suffix < limit and full[-1 - suffix] == other[-1 - suffix]:
        suffix += 1
    return prefix, len(full) - suffix


# Replaces an assistant message's content to locate it by difference; a
# private-use character no template transforms or trims.
_PROBE = "\ue000"


def prefix_spans(render, messages: Sequence[Mapping], full: str, add_generation_prompt: bool) -> list[Span]:
    """Assistant spans of `full` (= ``render(messages, add_generation_prompt)``) found by rendering
    parts of the conversation, for templates without ``{% generation %}``.

    `render(messages, add_generation_prompt) -> text`. Assistant turn ``i``
    spans from the end of the prompt before it (the conversation up to
    message ``i`` with the generation prompt, i.e. what the model reads before
    writing) to the end of the conversation that stops after it (so the
    turn's end-of-turn token and what the template writes after it, such as
    chatml's ``\\n``, are in). When the template renders a turn differently
    once later turns follow (Qwen 3 drops earlier turns' reasoning), the
    span is found by difference instead: the content is where the rendering
    changes when the content is replaced, and the turn's ending is what
    follows the content when it is the last turn. ValueError if neither works.
    """
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(messages[:i], True)
        start = _common_prefix(full, before)
        through = render(messages[: i + 1], False)
        if full.startswith(through) and len(through) > start:
            spans.append((start, len(through)))
            continue
        probed = [*messages[:i], {**message, "content": _PROBE}, *messages[i + 1 :]]
        content_start, content_end = _changed_span(full, render(probed, add_generation_prompt))
        last_probed = render([*messages[:i], {**message, "content": _PROBE}], False)
        _, tail_start = _changed_span(through, last_probed)
        ending = through[tail_start:]
        if not full.startswith(ending, content_end):
            raise ValueError(f"cannot tell where assistant message {i} ends in the rendered conversation (the "
                             "template renders it differently when later turns follow); add {% generation %} "
                             "markers to the template or pass a built-in template")  # fmt: skip
        spans.append((min(start, content_start), content_end + len(ending)))
    return spans
