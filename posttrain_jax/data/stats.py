"""Counts of what the data pipeline kept, cut and dropped, with a report.

Every example that does not reach a batch intact is counted here, per source
(DESIGN.md: nothing is silently dropped). The tokenization pre-pass fills the
per-source counts; the pipeline adds how the examples were scheduled and
packed. `PipelineStats.report()` is what the trainer prints at the end.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# How many bad-row messages to keep per source for the report: enough to see
# the pattern, not so many that a broken file floods the log.
MAX_BAD_ROW_SAMPLES = 5


@dataclass
class SourceStats:
    """Counts for one source (a file or a file pattern).

    `examples` are the rows that became training examples; `truncated` of them
    were cut to ``seq_len + 1`` tokens. Rows that did not become examples are
    in exactly one of `skipped_bad_rows`, `dropped_too_long`,
    `dropped_no_loss_tokens`. `draws` is how many times the mixture uses the
    source's examples (examples x epochs); `dropped_remainder` of those draws
    fell in the last, incomplete global batch and were not yielded.
    """

    name: str
    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_loss_tokens: int = 0
    skipped_bad_rows: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    draws: int = 0
    dropped_remainder: int = 0
    bad_row_samples: list[str] = field(default_factory=list)
    # skipped_bad_rows split by reason ("unknown role 'bing'", "invalid JSON", ...).
    bad_row_reasons: dict[str, int] = field(default_factory=dict)

    def add_bad_row(self, message: str, reason: str = "invalid row") -> None:
        """Count a skipped row under `reason`, keeping its message if few are kept so far."""
        self.skipped_bad_rows += 1
        self.bad_row_reasons[reason] = self.bad_row_reasons.get(reason, 0) + 1
        if len(self.bad_row_samples) < MAX_BAD_ROW_SAMPLES:
            self.bad_row_samples.append(message)

    def to_dict(self) -> dict:
        """A JSON-serialisable copy (for metrics files)."""
        return dataclasses.asdict(self)


def bad_row_reason_lines(s: SourceStats) -> list[str]:
    """The report's line of skipped rows per reason, most frequent first (none if no bad rows)."""
    if not s.bad_row_reasons:
        return []
    ranked = sorted(s.bad_row_reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    return ["    bad rows by reason: " + ", ".join(f"{reason}: {n}" for reason, n in ranked)]


@dataclass
class PipelineStats:
    """Counts for a whole pipeline: its sources and the batches it yields.

    `rows` and `batches` are global (all hosts together); `padding_tokens` is
    the number of padding positions in those rows.
    """

    sources: list[SourceStats]
    seq_len: int
    global_batch: int
    packing: bool
    rows: int = 0
    batches: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    padding_tokens: int = 0
    padding_rows: int = 0

    @property
    def examples(self) -> int:
        """Examples kept by the tokenization pre-pass, over all sources."""
        return sum(s.examples for s in self.sources)

    @property
    def draws(self) -> int:
        """Example draws yielded in batches (after the remainder is dropped)."""
        return sum(s.draws - s.dropped_remainder for s in self.sources)

    def to_dict(self) -> dict:
        """A JSON-serialisable copy (for metrics files)."""
        return dataclasses.asdict(self)

    def report(self) -> str:
        """A human-readable summary, one block per source."""
        slots = self.rows * self.seq_len
        fill = 100.0 * self.tokens / slots if slots else 0.0
        mode = "packed" if self.packing else "padded"
        if self.batches:
            lines = [
                f"data: {self.batches} global batches of {self.global_batch} x {self.seq_len} ({mode}); "
                f"{self.draws} examples, {self.tokens} tokens ({fill:.1f}% of slots), {self.loss_tokens} loss tokens"
            ]
        else:  # reported before batches were planned (an error on the way)
            lines = [f"data: {self.examples} examples from {len(self.sources)} source(s), no batches planned"]
        if self.padding_rows:
            lines.append(f"  {self.padding_rows} all-padding rows fill the last batch")
        for s in self.sources:
            draws = f", {s.draws} draws" if self.batches else ""
            lines.append(f"  {s.name}: {s.rows} rows -> {s.examples} examples ({s.truncated} truncated){draws}")
            dropped = {
                "skipped bad rows": s.skipped_bad_rows,
                "dropped too long": s.dropped_too_long,
                "dropped with no loss tokens": s.dropped_no_loss_tokens,
                "draws dropped in the last partial batch": s.dropped_remainder,
            }
            if any(dropped.values()):
                lines.append("    " + ", ".join(f"{k}: {v}" for k, v in dropped.items() if v))
            lines += bad_row_reason_lines(s)
            for message in s.bad_row_samples:
                lines.append(f"    skipped: {message}")
            if s.skipped_bad_rows > len(s.bad_row_samples):
                lines.append(f"    ... and {s.skipped_bad_rows - len(s.bad_row_samples)} more bad rows")
        return "\n".join(lines)
