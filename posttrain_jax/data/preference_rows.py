"""Preference rows: parsing, validation, and the tokenization pre-pass.

A row (JSONL line or Parquet row; extra fields are ignored) holds:

- ``prompt``: a string (one user turn) or a list of messages ending with a
  user turn (earlier assistant turns are context, never trained on);
- ``chosen``, ``rejected`` (and optionally ``edited``): each a string (the
  assistant reply) or a list of messages whose last is the assistant reply.
  A list may repeat the prompt before the reply (the "whole conversation"
  format); then ``prompt`` may be left out, and every response must continue
  the same conversation;
- ``margin`` (optional float): the pair's margin, e.g. for Llama 2's margin
  reward-model loss;
- ``strength`` (optional): how much better chosen is, one of `STRENGTHS`
  (Llama 3's levels; case and ``_`` vs space are not significant).

A row with ``edited`` (a human edit of chosen, ranked edited > chosen >
rejected as in Llama 3) becomes three pairs: (edited, chosen), (edited,
rejected), (chosen, rejected). ``margin`` and ``strength`` grade chosen
against rejected, so only that pair carries them; pairs with ``edited``
have margin 0.0 and no strength. Pairs of a row are independent draws of
the mixture (not kept in one batch).

Tokenization: the prompt is rendered once with the chat template and its
generation prompt (the assistant header), and each response is the rest of
the rendered conversation, so chosen and rejected share the exact prompt
ids. The loss mask is the assistant mask of `render_chat` on the response
tokens only; `mask_special_tokens` also clears the template's special tokens
(and bos/eos) there, as Llama 3 does for DPO. A pair longer than a batch row
(``len(chosen) - 1 + len(rejected) - 1 > seq_len``) has its responses cut
(the longer first, keeping the prompt whole) or is dropped, per
`length_policy`; a pair whose prompt alone leaves no room is dropped.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from posttrain_jax.data.examples import BAD_ROW_POLICIES, LENGTH_POLICIES, TokenizedSource, check_choice, check_template
from posttrain_jax.data.sources import DataError, _as_messages, bad_row_reason, count_rows, read_rows
from posttrain_jax.data.stats import SourceStats
from posttrain_jax.metrics import progress_bar
from posttrain_jax.tokenizer import (
    Tokenizer,
    render_chat,
    template_special_tokens,
    validate_messages,
)

# Llama 3's preference strengths, strongest first; a pair's `strength` code is
# its index here plus 1 (0 = none given).
STRENGTHS = ("significantly better", "better", "slightly better", "marginally better")
# Llama 2's "margin small" values per strength (its RM loss is
# -log sigmoid(r_chosen - r_rejected - margin)).
LLAMA2_STRENGTH_MARGINS = {"significantly better": 1.0, "better": 2 / 3, "slightly better": 1 / 3,
                           "marginally better": 0.0}  # fmt: skip
_PAIRS = (("chosen", "rejected"),)
_EDITED_PAIRS = (("edited", "chosen"), ("edited", "rejected"), ("chosen", "rejected"))


def normalize_strength(value: object) -> str:
    """A strength label in `STRENGTHS` form; ValueError listing the valid ones."""
    if isinstance(value, str):
        label = " ".join(value.lower().replace("_", " ").split())
        if label in STRENGTHS:
            return label
    raise ValueError(f"strength {value!r} is not one of {', '.join(map(repr, STRENGTHS))}")


@dataclass(frozen=True)
class PreferenceRow:
    """A validated row: the shared context and the ranked responses."""

    context: list[dict]  # messages before the responses, ending with a user turn
    responses: dict[str, dict]  # "chosen", "rejected" (and "edited") -> its assistant message
    margin: float | None = None
    strength: str | None = None

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """(better, worse) response fields of the row's pairs."""
        return _EDITED_PAIRS if "edited" in self.responses else _PAIRS


def _response(value: object, field: str) -> tuple[list[dict], dict]:
    """(messages before the reply, the reply) of a response field."""
    if isinstance(value, str):
        return [], {"role": "assistant", "content": value}
    if not isinstance(value, list):
        raise ValueError(f"field {field!r} must be a string or a list of messages, got {type(value).__name__}")
    if not value:
        raise ValueError(f"field {field!r} is an empty list")
    messages = [dict(m) if isinstance(m, Mapping) else m for m in value]
    if not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise ValueError(f"the last message of {field!r} must be the assistant reply, got {str(messages[-1])[:80]}")
    return messages[:-1], messages[-1]


def to_preference_row(record: object) -> PreferenceRow:
    """Validate one parsed row (see the module docstring). Raises ValueError
    describing the problem; the caller adds the row's location."""
    if not isinstance(record, Mapping):
        raise ValueError(f"expected an object with 'prompt', 'chosen' and 'rejected', got {type(record).__name__}")
    for field in ("chosen", "rejected"):
        if record.get(field) is None:
            keys = ", ".join(repr(k) for k in record) or "none"
            raise ValueError(f"missing field {field!r} (row has keys: {keys})")
    fields = [f for f in ("edited", "chosen", "rejected") if record.get(f) is not None]
    parsed = {field: _response(record[field], field) for field in fields}
    if record.get("prompt") is not None:
        context = [dict(m) if isinstance(m, Mapping) else m for m in _as_messages(record["prompt"], "prompt", "user")]
        if not context:
            raise ValueError("field 'prompt' is an empty list")
        for field, (before, _) in parsed.items():
            if before and before != context:
                raise ValueError(f"the messages before the reply in {field!r} differ from 'prompt'; give the "
                                 "reply alone or the whole conversation")  # fmt: skip
    else:
        context = parsed["chosen"][0]
        if any(not before for before, _ in parsed.values()):
            raise ValueError("missing field 'prompt' (or give every response as the whole conversation)")
        if any(before != context for before, _ in parsed.values()):
            raise ValueError("the responses continue different conversations (their messages before the reply "
                             "differ)")  # fmt: skip
    responses = {}
    for field, (_, reply) in parsed.items():
        try:
            validate_messages([*context, reply])
        except ValueError as e:
            raise ValueError(f"prompt + {field!r}: {e}") from None
        if not reply["content"].strip():
            raise ValueError(f"empty {field!r} response")
        responses[field] = reply
    margin = record.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):  # fmt: skip
        raise ValueError(f"field 'margin' must be a finite number, got {margin!r}")
    strength = record.get("strength")
    return PreferenceRow(context=context, responses=responses, margin=None if margin is None else float(margin),
                         strength=None if strength is None else normalize_strength(strength))  # fmt: skip


@dataclass
class PreferenceSourceStats(SourceStats):
    """`SourceStats` of a preference source, where an example is a *pair*.

    `examples`, `truncated`, `dropped_too_long` (including pairs that
    truncation made identical, and pairs whose prompt leaves no room) and
    `dropped_no_loss_tokens` count pairs; `rows`, `skipped_bad_rows`,
    `edited_rows` (rows expanded into three pairs) and
    `filtered_by_strength` (rows removed by ``keep_strengths``) count rows.
    `tokens` and `loss_tokens` cover both sequences of each kept pair.
    """

    edited_rows: int = 0
    filtered_by_strength: int = 0


@dataclass
class TokenizedPairs:
    """The kept pairs of a source: sequence ``2i`` is pair ``i``'s chosen
    (better) response after the prompt, ``2i + 1`` its rejected one."""

    sequences: TokenizedSource
    margin: np.ndarray  # float32 [num_pairs]
    strength: np.ndarray  # int32 [num_pairs]: 0 = none, k = STRENGTHS[k - 1]

    @property
    def stats(self) -> PreferenceSourceStats:
        return self.sequences.stats

    def __len__(self) -> int:
        return len(self.margin)

    @property
    def lengths(self) -> np.ndarray:
        """Shifted tokens of each pair (both sequences), i.e. its room in a row."""
        return (self.sequences.lengths - 1).reshape(-1, 2).sum(axis=1)


class PairEncoder:
    """Renders a row's prompt and responses into token ids and loss flags."""

    def __init__(self, tokenizer: Tokenizer, *, template: str, mask_special_tokens: bool = False,
                 reward_inputs: bool = False):  # fmt: skip
        check_template(tokenizer, template)
        self.tokenizer, self.template = tokenizer, template
        # reward_inputs: append a filler id (never an input, never trained) so
        # that, once shifted, the inputs are the whole conversation.
        filler = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
        self.filler = [filler] if reward_inputs else []
        special = {tokenizer.token_to_id(t) for t in template_special_tokens(template, tokenizer)}
        special |= {i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None}
        self.masked_ids = frozenset(special) if mask_special_tokens else frozenset()

    def encode(self, row: PreferenceRow) -> tuple[list[int], dict[str, tuple[list[int], list[bool]]]]:
        """(prompt ids, {field: (response ids, response loss flags)})."""
        prompt = render_chat(self.tokenizer, row.context, template=self.template, add_generation_prompt=True)
        return prompt.ids, {field: self._response(prompt, [*row.context, reply])
                            for field, reply in row.responses.items()}  # fmt: skip

    def _response(self, prompt, messages: list[dict]) -> tuple[list[int], list[bool]]:
        full = render_chat(self.tokenizer, messages, template=self.template)
        n = len(prompt.ids)
        if full.ids[:n] == prompt.ids:
            ids, trained = full.ids[n:], full.assistant_mask[n:]
        else:
            # The tokenizer merged across the prompt/reply boundary: encode the
            # reply's text on its own (as TRL does), so the prompt ids stay
            # those of the prompt. All of it is the reply's turn (content, end
            # of turn and what the template writes after it, as `render_chat`
            # masks a final assistant turn).
            if not full.text.startswith(prompt.text):
                raise ValueError(f"template {self.template!r}: the conversation does not extend its prompt")
            ids = self.tokenizer.encode(full.text[len(prompt.text) :])
            trained = [True] * len(ids)
        if self.masked_ids:
            trained = [t and i not in self.masked_ids for i, t in zip(ids, trained)]
        return [*ids, *self.filler], [*trained, *([False] * len(self.filler))]


def response_caps(prompt_len: int, lengths: tuple[int, int], seq_len: int) -> tuple[int, int] | None:
    """How many response tokens of each sequence of a pair fit in one row.

    Both sequences (prompt + response, shifted) share a row of `seq_len`.
    The longer response is cut first; past an equal share both are cut.
    None if the prompt leaves less than one token per response.
    """
    room = seq_len + 2 - 2 * prompt_len
    a, b = lengths
    if a + b <= room:
        return a, b
    if room < 2:
        return None
    cap_a = min(a, max(room // 2, room - b))
    return cap_a, min(b, room - cap_a)


def _strength_margins(strength_margins: Mapping[str, float] | None, keep: frozenset | None) -> dict[str, float]:
    if strength_margins is None:
        return {}
    margins = {normalize_strength(k): float(v) for k, v in strength_margins.items()}
    missing = [s for s in (keep or STRENGTHS) if s not in margins]
    if missing:
        raise ValueError(f"strength_margins has no margin for {', '.join(map(repr, missing))}")
    return margins


def normalize_keep_strengths(keep_strengths: Iterable[str] | str | None) -> frozenset | None:
    """`keep_strengths` as a set of `STRENGTHS` labels (None: keep all)."""
    if keep_strengths is None:
        return None
    if isinstance(keep_strengths, str):
        keep_strengths = [keep_strengths]
    return frozenset(normalize_strength(s) for s in keep_strengths)


def tokenize_preference_source(path: str | Path, encoder: PairEncoder, *, seq_len: int,
                               keep_strengths: frozenset | None = None,
                               strength_margins: Mapping[str, float] | None = None, length_policy: str = "truncate",
                               on_bad_row: str = "error", name: str | None = None) -> TokenizedPairs:  # fmt: skip
    """Read, validate and tokenize every row of a preference source.

    Rows whose strength is not in `keep_strengths` are counted and left out
    (rows without a strength are kept). A pair gets the row's ``margin``,
    else ``strength_margins[strength]`` if given, else 0.0. A malformed row
    (missing field, empty or identical responses, bad strength or margin)
    raises `DataError` naming file and line, or with on_bad_row="skip" is
    counted and its message kept for the report.
    """
    check_choice("length_policy", length_policy, LENGTH_POLICIES)
    check_choice("on_bad_row", on_bad_row, BAD_ROW_POLICIES)
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a row holds both sequences of a pair), got {seq_len}")
    margins_by_strength = _strength_margins(strength_margins, keep_strengths)
    stats = PreferenceSourceStats(name=name or str(path))
    ids_out, trained_out, offsets = array("i"), bytearray(), array("q", [0])
    margins, strengths = array("f"), array("i")
    bar = progress_bar(count_rows(path), desc=f"tokenizing {stats.name}", unit="row")
    for raw in read_rows(path):
        bar.update()
        stats.rows += 1
        try:
            if raw.parse_error is not None:
                raise ValueError(raw.parse_error)
            row = to_preference_row(raw.record)
            if keep_strengths is not None and row.strength is not None and row.strength not in keep_strengths:
                stats.filtered_by_strength += 1
                continue
            prompt_ids, responses = encoder.encode(row)
            for better, worse in row.pairs():
                if responses[better][0] == responses[worse][0]:
                    raise ValueError(f"identical {better!r} and {worse!r} responses (once rendered)")
        except ValueError as e:
            message = f"{raw.location}: {e}"
            if on_bad_row == "error":
                raise DataError(message + ' (pass on_bad_row="skip" to skip and count bad rows)') from e
            stats.add_bad_row(message, bad_row_reason(e))
            continue
        stats.edited_rows += "edited" in row.responses
        for better, worse in row.pairs():
            (ids_a, trained_a), (ids_b, trained_b) = responses[better], responses[worse]
            caps = response_caps(len(prompt_ids), (len(ids_a), len(ids_b)), seq_len)
            truncated = caps is None or caps != (len(ids_a), len(ids_b))
            if truncated and (length_policy == "drop" or caps is None or ids_a[: caps[0]] == ids_b[: caps[1]]):
                stats.dropped_too_long += 1
                continue
            cap_a, cap_b = caps
            # The prompt has at least the assistant header, so every response
            # token is a target; both sequences need a trained one.
            loss_a, loss_b = sum(trained_a[:cap_a]), sum(trained_b[:cap_b])
            if loss_a == 0 or loss_b == 0:
                stats.dropped_no_loss_tokens += 1
                continue
            for ids, trained in ((ids_a[:cap_a], trained_a[:cap_a]), (ids_b[:cap_b], trained_b[:cap_b])):
                ids_out.extend(prompt_ids)
                ids_out.extend(ids)
                trained_out.extend(bytes(len(prompt_ids)))
                trained_out.extend(trained)
                offsets.append(len(ids_out))
            graded = (better, worse) == ("chosen", "rejected")
            strength = row.strength if graded else None
            margin = row.margin if graded and row.margin is not None else margins_by_strength.get(strength, 0.0)
            margins.append(margin)
            strengths.append(0 if strength is None else STRENGTHS.index(strength) + 1)
            stats.examples += 1
            stats.truncated += truncated
            stats.tokens += 2 * len(prompt_ids) + cap_a + cap_b - 2
            stats.loss_tokens += loss_a + loss_b
    bar.close()
    sequences = TokenizedSource(
        stats=stats,
        ids=np.frombuffer(ids_out, dtype=np.int32).copy() if ids_out else np.zeros(0, np.int32),
        trained=np.frombuffer(bytes(trained_out), dtype=np.bool_).copy(),
        offsets=np.frombuffer(offsets, dtype=np.int64).copy(),
    )
    return TokenizedPairs(sequences=sequences, margin=np.frombuffer(margins, dtype=np.float32).copy(),
                          strength=np.frombuffer(strengths, dtype=np.int32).copy())  # fmt: skip
