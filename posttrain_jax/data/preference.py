"""Preference (reward-model / DPO) pipelines: pairs -> mixed, per-host batches.

Rows, validation, strengths, ``edited`` expansion and truncation are
described in `posttrain_jax.data.preference_rows`. Mixing, epochs, the seed,
per-host sharding and the resumable `BatchIterator` are the SFT pipeline's
(`posttrain_jax.data.pipeline`).

Batch contract. **A row holds whole pairs**: pair ``k`` of a row (``k = 0,
1, ...``) is two consecutive segments, its chosen sequence (segment ``2k +
1``) then its rejected one (segment ``2k + 2``), each the prompt followed by
the response and shifted on its own exactly like an SFT example (see
`packing`). Without packing a row holds one pair (``pairs_per_row == 1``,
``rows == pairs``); with packing it holds as many as fit. Either way
``seq_len`` bounds ``len(chosen) - 1 + len(rejected) - 1``. Keys, per host,
``R = rows`` and ``P = pairs_per_row`` (both fixed for the iterator):

- ``tokens``, ``targets``, ``loss_mask``, ``positions``, ``segment_ids``:
  int32 ``[R, seq_len]``, the SFT contract; ``loss_mask`` is 1 on response
  tokens only; ``segment_ids`` doubles as the sequence id;
- ``margin``: float32 ``[R, P]``, the pair's margin (0.0 if none);
- ``pair_mask``: int32 ``[R, P]``, 1 for a real pair, 0 for an empty slot;
- ``strength``: int32 ``[R, P]``, 0 = none, ``k`` = ``STRENGTHS[k - 1]``
  (1 = "significantly better", ..., 4 = "marginally better");
- ``chosen_last``, ``rejected_last``: int32 ``[R, P]``, the column of the
  sequence's last position (a reward model reads its score there; the
  input token there is the sequence's second-to-last id, or with
  ``reward_inputs`` its last: the conversation's last token), 0 for empty
  slots.

Every key has the rows as its leading axis and a pair never spans rows, so
any split of the rows (hosts, data-parallel devices, gradient-accumulation
micro-batches) keeps pairs and their per-pair values together. Losses take
flat ``[R * P]`` pair arrays: `posttrain_jax.losses.dpo.batch_sequence_ids`
numbers the sequences of a (micro-)batch so that they line up with
``margin.reshape(-1)`` and ``pair_mask.reshape(-1)``.

Every global batch holds exactly ``global_pairs`` pairs (the last eval batch
fewer, the rest empty slots): host ``h`` gets pairs ``[h * pairs, (h + 1) *
pairs)`` of it, ``pairs = global_pairs // process_count``, in ``rows`` rows.
With packing, ``rows`` is the most rows any host batch of the run needs
(first-fit decreasing), rounded up to ``rows_multiple``; batches needing
fewer get all-zero rows. The pairs of a global batch do not depend on the
host count, so an iterator state resumes on another host count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from posttrain_jax.data.mixing import mixture_order, num_draws
from posttrain_jax.data.packing import BATCH_KEYS, build_row, plan_rows
from posttrain_jax.data.pipeline import BatchIterator, SourceSpec, _as_specs, _host_layout
from posttrain_jax.data.preference_rows import (
    LLAMA2_STRENGTH_MARGINS,
    STRENGTHS,
    PairEncoder,
    TokenizedPairs,
    normalize_keep_strengths,
    tokenize_preference_source,
)
from posttrain_jax.data.stats import PipelineStats, bad_row_reason_lines
from posttrain_jax.data.synthetic import generate_problems
from posttrain_jax.tokenizer import Tokenizer

_STATE_VERSION = 1
PAIR_KEYS = ("margin", "pair_mask", "strength", "chosen_last", "rejected_last")
PREFERENCE_BATCH_KEYS = BATCH_KEYS + PAIR_KEYS


@dataclass
class PreferenceStats(PipelineStats):
    """`PipelineStats` of a preference pipeline (sources are
    `PreferenceSourceStats`). `rows` are global rows of all batches;
    `empty_pair_slots` are the unused pair slots of the last eval batch."""

    global_pairs: int = 0
    pairs_per_row: int = 0
    empty_pair_slots: int = 0

    def report(self) -> str:
        """A human-readable summary, one block per source."""
        slots = self.rows * self.seq_len
        fill = 100.0 * self.tokens / slots if slots else 0.0
        mode = f"packed, up to {self.pairs_per_row} pairs per row" if self.packing else "one pair per row"
        lines = [
            f"preference data: {self.batches} global batches of {self.global_pairs} pairs in {self.global_batch} "
            f"rows x {self.seq_len} ({mode}); {self.draws} pairs, {self.tokens} tokens ({fill:.1f}% of slots), "
            f"{self.loss_tokens} loss tokens"
        ]
        if self.empty_pair_slots:
            lines.append(f"  {self.empty_pair_slots} empty pair slots fill the last batch")
        if self.padding_rows:
            lines.append(f"  {self.padding_rows} all-padding rows")
        for s in self.sources:
            lines.append(f"  {s.name}: {s.rows} rows -> {s.examples} pairs ({s.truncated} truncated, "
                         f"{s.edited_rows} rows with 'edited' -> 3 pairs each), {s.draws} draws")  # fmt: skip
            dropped = {
                "rows filtered by strength": s.filtered_by_strength,
                "skipped bad rows": s.skipped_bad_rows,
                "pairs dropped too long": s.dropped_too_long,
                "pairs dropped with no loss tokens": s.dropped_no_loss_tokens,
                "draws dropped in the last partial batch": s.dropped_remainder,
            }
            if any(dropped.values()):
                lines.append("    " + ", ".join(f"{k}: {v}" for k, v in dropped.items() if v))
            lines += bad_row_reason_lines(s)
            lines += [f"    skipped: {message}" for message in s.bad_row_samples]
            if s.skipped_bad_rows > len(s.bad_row_samples):
                lines.append(f"    ... and {s.skipped_bad_rows - len(s.bad_row_samples)} more bad rows")
        return "\n".join(lines)


class _PairPlan:
    """Which pairs each host batch holds, row by row; builds batches on demand."""

    def __init__(self, sources: list[TokenizedPairs], draw_source: np.ndarray, draw_pair: np.ndarray, *,
                 seq_len: int, packing: bool, num_batches: int, pairs: int, process_count: int,
                 rows_multiple: int):  # fmt: skip
        self.sources, self.draw_source, self.draw_pair = sources, draw_source, draw_pair
        self.seq_len, self.process_count = seq_len, process_count
        self.draw_length = np.zeros(len(draw_source), np.int64)
        self.draw_loss = np.zeros(len(draw_source), np.int64)
        for i, source in enumerate(sources):
            picked = draw_source == i
            seq = source.sequences
            loss = np.add.reduceat(seq.trained.astype(np.int64), seq.offsets[:-1]) if len(seq) else np.zeros(0)
            self.draw_length[picked] = source.lengths[draw_pair[picked]]
            self.draw_loss[picked] = loss.reshape(-1, 2).sum(axis=1)[draw_pair[picked]]
        # Chunk c = batch c // process_count, host c % process_count; its rows
        # are rows chunk_rows[c]:chunk_rows[c + 1] of the CSR (row_offsets, row_draws).
        row_sizes, row_draws, chunk_sizes = [], [], []
        for chunk in range(num_batches * process_count):
            draws = np.arange(chunk * pairs, min((chunk + 1) * pairs, len(draw_source)), dtype=np.int64)
            if packing:  # first-fit decreasing: the fewest rows, as rows is the max over chunks
                draws = draws[np.argsort(-self.draw_length[draws], kind="stable")]
            offsets, order = plan_rows(self.draw_length[draws], seq_len, packing=packing, window=max(len(draws), 1))
            row_sizes.append(np.diff(offsets))
            row_draws.append(draws[order])
            chunk_sizes.append(len(offsets) - 1)
        self.row_offsets = np.concatenate([[0], np.cumsum(np.concatenate(row_sizes))]).astype(np.int64)
        self.row_draws = np.concatenate(row_draws).astype(np.int64)
        self.chunk_rows = np.concatenate([[0], np.cumsum(chunk_sizes)]).astype(np.int64)
        # Without packing a batch always has one row per pair slot, even an eval
        # run shorter than one batch.
        self.rows = -(-max(max(chunk_sizes), 1 if packing else pairs) // rows_multiple) * rows_multiple
        self.pairs_per_row = int(max([sizes.max() for sizes in row_sizes if len(sizes)] or [1]))

    def batch(self, batch_index: int, host: int) -> dict[str, np.ndarray]:
        """Host `host`'s arrays of global batch `batch_index`."""
        out = {key: np.zeros((self.rows, self.seq_len), np.int32) for key in BATCH_KEYS}
        out.update({key: np.zeros((self.rows, self.pairs_per_row), np.int32) for key in PAIR_KEYS})
        out["margin"] = np.zeros((self.rows, self.pairs_per_row), np.float32)
        chunk = batch_index * self.process_count + host
        for r, row in enumerate(range(self.chunk_rows[chunk], self.chunk_rows[chunk + 1])):
            sequences = []
            for k, draw in enumerate(self.row_draws[self.row_offsets[row] : self.row_offsets[row + 1]]):
                source, pair = self.sources[self.draw_source[draw]], self.draw_pair[draw]
                sequences += [source.sequences.example(2 * pair), source.sequences.example(2 * pair + 1)]
                out["margin"][r, k], out["strength"][r, k] = source.margin[pair], source.strength[pair]
                out["pair_mask"][r, k] = 1
            for key, value in build_row(sequences, self.seq_len).items():
                out[key][r] = value
            last = np.cumsum([len(ids) - 1 for ids, _ in sequences]) - 1
            out["chosen_last"][r, : len(last) // 2], out["rejected_last"][r, : len(last) // 2] = last[0::2], last[1::2]
        return out

    def fingerprint(self, *extra) -> str:
        """A hash of the pair order (not of the host layout, so a state
        resumes on another host count)."""
        h = hashlib.blake2b(repr(extra).encode(), digest_size=8)
        for array in (self.draw_source, self.draw_pair, self.draw_length, self.draw_loss):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()


class _HostBatches:
    """grain random-access source: this host's batches, in order."""

    def __init__(self, plan: _PairPlan, num_batches: int, host: int):
        self._plan, self._num_batches, self._host = plan, num_batches, host

    def __len__(self) -> int:
        return self._num_batches

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._plan.batch(index, self._host)


class PreferenceBatchIterator(BatchIterator):
    """A `BatchIterator` over preference batches (keys `PREFERENCE_BATCH_KEYS`,
    see the module docstring). Besides ``rows`` and ``seq_len``:
    ``global_pairs``, ``pairs`` (this host's pairs per batch) and
    ``pairs_per_row``; ``global_batch`` is the global row count."""

    def __init__(self, dataset: grain.IterDataset, *, global_pairs: int, pairs: int, pairs_per_row: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.global_pairs, self.pairs, self.pairs_per_row = global_pairs, pairs, pairs_per_row

    def __str__(self) -> str:
        return (f"PreferenceBatchIterator(num_batches={self.num_batches}, pairs={self.pairs}, rows={self.rows}, "
                f"pairs_per_row={self.pairs_per_row}, seq_len={self.seq_len})")  # fmt: skip


def _pipeline(sources, tokenizer: Tokenizer, *, template: str, seq_len: int, global_pairs: int, packing: bool,
              mask_special_tokens: bool, reward_inputs: bool, keep_strengths, strength_margins,
              length_policy: str, on_bad_row: str,
              seed: int, epochs: float | None, train: bool, rows_multiple: int, process_index: int | None,
              process_count: int | None) -> tuple[PreferenceBatchIterator, PreferenceStats]:  # fmt: skip
    specs = _as_specs(sources)
    if train and epochs is not None:
        specs = _as_specs([dataclasses.replace(spec, epochs=epochs) for spec in specs])
    if not train:
        for spec in specs:
            if spec.weight is not None or spec.epochs != 1:
                raise ValueError(f"eval source {spec.path}: eval reads every pair once; drop weight and epochs")
    if rows_multiple < 1:
        raise ValueError(f"rows_multiple must be >= 1, got {rows_multiple}")
    process_index, process_count, pairs = _host_layout(global_pairs, process_index, process_count,
                                                       name="global_pairs")  # fmt: skip
    keep = normalize_keep_strengths(keep_strengths)
    encoder = PairEncoder(tokenizer, template=template, mask_special_tokens=mask_special_tokens,
                          reward_inputs=reward_inputs)
    tokenized = [
        tokenize_preference_source(spec.path, encoder, seq_len=seq_len, keep_strengths=keep,
                                   strength_margins=strength_margins, length_policy=length_policy,
                                   on_bad_row=on_bad_row, name=spec.name)
        for spec in specs
    ]  # fmt: skip
    stats = PreferenceStats(sources=[t.stats for t in tokenized], seq_len=seq_len, global_batch=0, packing=packing,
                            global_pairs=global_pairs)  # fmt: skip
    for source, spec in zip(tokenized, specs):
        if num_draws(len(source), spec.epochs) == 0:
            raise ValueError(f"source {source.stats.name} contributes no pairs ({len(source)} usable pairs x "
                             f"{spec.epochs} epochs); fix or remove it:\n" + stats.report())  # fmt: skip
    draw_source, draw_pair = mixture_order(
        [len(s) for s in tokenized], epochs=[spec.epochs for spec in specs],
        weights=[spec.weight for spec in specs], seed=seed, shuffle=train,
    )  # fmt: skip
    if train:
        num_batches = len(draw_source) // global_pairs
        if num_batches == 0:
            raise ValueError(f"the data make {len(draw_source)} pairs, fewer than one global batch of "
                             f"{global_pairs}; lower global_pairs or add data:\n" + stats.report())  # fmt: skip
    else:
        num_batches = -(-len(draw_source) // global_pairs)
    used = min(num_batches * global_pairs, len(draw_source))
    plan = _PairPlan(tokenized, draw_source[:used], draw_pair[:used], seq_len=seq_len, packing=packing,
                     num_batches=num_batches, pairs=pairs, process_count=process_count,
                     rows_multiple=rows_multiple)  # fmt: skip
    for i, source_stats in enumerate(stats.sources):
        source_stats.draws = int(np.sum(draw_source == i))
        source_stats.dropped_remainder = int(np.sum(draw_source[used:] == i))
    stats.batches, stats.pairs_per_row = num_batches, plan.pairs_per_row
    stats.global_batch = plan.rows * process_count
    stats.rows = num_batches * stats.global_batch
    stats.padding_rows = stats.rows - (len(plan.row_offsets) - 1)
    stats.empty_pair_slots = num_batches * global_pairs - used
    stats.tokens, stats.loss_tokens = int(plan.draw_length.sum()), int(plan.draw_loss.sum())
    stats.padding_tokens = stats.rows * seq_len - stats.tokens

    dataset = grain.MapDataset.source(_HostBatches(plan, num_batches, process_index))
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    fingerprint = plan.fingerprint(_STATE_VERSION, "preference", seq_len, global_pairs, packing, train,
                                   mask_special_tokens, sorted(keep or ()), strength_margins,
                                   *(("reward_inputs",) if reward_inputs else ()))  # fmt: skip
    iterator = PreferenceBatchIterator(
        iter_dataset, global_pairs=global_pairs, pairs=pairs, pairs_per_row=plan.pairs_per_row,
        num_batches=num_batches, rows=plan.rows, seq_len=seq_len, global_batch=stats.global_batch,
        fingerprint=fingerprint, stats=stats,
    )  # fmt: skip
    return iterator, stats


def make_preference_pipeline(sources, tokenizer: Tokenizer, *, template: str, seq_len: int, global_pairs: int,
                             packing: bool = False, mask_special_tokens: bool = False, reward_inputs: bool = False,
                             keep_strengths: Iterable[str] | None = None,
                             strength_margins: Mapping[str, float] | None = None, length_policy: str = "truncate",
                             on_bad_row: str = "error", seed: int = 0, epochs: float | None = None,
                             rows_multiple: int = 1, process_index: int | None = None,
                             process_count: int | None = None,
                             ) -> tuple[PreferenceBatchIterator, PreferenceStats]:  # fmt: skip
    """Build the preference train pipeline: this host's batches and the stats.

    sources: as for `make_sft_pipeline` (paths, `SourceSpec`s or dicts; a
      weighted mixture with epochs).
    seq_len: the row length; a row holds a whole pair (both sequences).
    global_pairs: pairs per global batch; each host gets ``global_pairs //
      process_count`` of them (see the module docstring for the layout).
    packing: several pairs per row (True) or one pair per row (False).
    mask_special_tokens: also leave the template's special tokens (end of
      turn, headers) and bos/eos out of the loss (Llama 3 DPO).
    reward_inputs: for reward models: each sequence's *inputs* are its whole
      rendered conversation (a filler target is appended), so the score read
      at a segment's last position is at the conversation's last token, the
      last non-pad token where transformers' ``*ForSequenceClassification``
      reads it (``<|eot_id|>``, or the ``\\n`` after ``<|im_end|>``).
    keep_strengths: keep only rows with these strengths (e.g. Llama 3's
      ``["significantly better", "better"]``); rows without one are kept.
    strength_margins: margin per strength for rows without a ``margin``
      (e.g. `LLAMA2_STRENGTH_MARGINS`); default 0.0.
    length_policy: "truncate" (cut responses, keep the prompt) or "drop"
      pairs that do not fit a row.
    on_bad_row: "error" (raise, naming file and line) or "skip" (count).
    seed, epochs, process_index, process_count: as for `make_sft_pipeline`.
    rows_multiple: round the (packed) row count up to a multiple of this,
      e.g. the data-parallel devices x accumulation steps per host.

    The iterator stops after ``num_batches`` full global batches; the last
    partial one is dropped and counted.
    """
    return _pipeline(sources, tokenizer, template=template, seq_len=seq_len, global_pairs=global_pairs,
                     packing=packing, mask_special_tokens=mask_special_tokens, reward_inputs=reward_inputs,
                     keep_strengths=keep_strengths,
                     strength_margins=strength_margins, length_policy=length_policy, on_bad_row=on_bad_row,
                     seed=seed, epochs=epochs, train=True, rows_multiple=rows_multiple,
                     process_index=process_index, process_count=process_count)  # fmt: skip


def make_preference_eval_pipeline(sources, tokenizer: Tokenizer, *, template: str, seq_len: int, global_pairs: int,
                                  packing: bool = False, mask_special_tokens: bool = False,
                                  reward_inputs: bool = False, keep_strengths: Iterable[str] | None = None,
                                  strength_margins: Mapping[str, float] | None = None,
                                  length_policy: str = "truncate", on_bad_row: str = "error",
                                  rows_multiple: int = 1, process_index: int | None = None,
                                  process_count: int | None = None,
                                  ) -> tuple[PreferenceBatchIterator, PreferenceStats]:  # fmt: skip
    """Build a preference eval pipeline: every pair once, in file order, no
    shuffle; the last global batch has empty pair slots (``pair_mask`` 0)
    so shapes stay static. Call ``iterator.reset()`` before each pass.
    Arguments are as for `make_preference_pipeline`; sources take no weight
    or epochs.
    """
    return _pipeline(sources, tokenizer, template=template, seq_len=seq_len, global_pairs=global_pairs,
                     packing=packing, mask_special_tokens=mask_special_tokens, reward_inputs=reward_inputs,
                     keep_strengths=keep_strengths,
                     strength_margins=strength_margins, length_policy=length_policy, on_bad_row=on_bad_row,
                     seed=0, epochs=None, train=False, rows_multiple=rows_multiple,
                     process_index=process_index, process_count=process_count)  # fmt: skip


def write_arithmetic_preferences(path: str | Path, n: int, *, seed: int = 0, max_operand: int = 19,
                                 strengths: bool = False) -> Path:  # fmt: skip
    """Write `n` synthetic preference rows (JSONL) for quickstarts and tests.

    Each row is ``{"prompt": question, "chosen": "a + b = c", "rejected":
    "a + b = w", "answer": c}``: chosen shows the work with the right
    answer, rejected the same work with a wrong one (off by 1 to 3, never
    negative). With ``strengths=True`` each row also gets a `STRENGTHS`
    label, drawn at random (to exercise ``keep_strengths``, not a signal).
    Deterministic given the seed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"preferences-{seed}")
    with path.open("w", encoding="utf-8") as f:
        for problem in generate_problems(n, seed=seed, max_operand=max_operand):
            user, assistant = problem.messages(show_work=True)
            offset = rng.choice((1, 2, 3))
            below = problem.answer >= offset and rng.random() < 0.5
            wrong = problem.answer - offset if below else problem.answer + offset
            chosen = assistant["content"]
            rejected = chosen.removesuffix(f"= {problem.answer}") + f"= {wrong}"
            row = {"prompt": user["content"], "chosen": chosen, "rejected": rejected, "answer": problem.answer}
            if strengths:
                row["strength"] = rng.choice(STRENGTHS)
            f.write(json.dumps(row) + "\n")
    return path


__all__ = [
    "LLAMA2_STRENGTH_MARGINS",
    "PAIR_KEYS",
    "PREFERENCE_BATCH_KEYS",
    "PreferenceBatchIterator",
    "PreferenceStats",
    "STRENGTHS",
    "SourceSpec",
    "make_preference_eval_pipeline",
    "make_preference_pipeline",
    "write_arithmetic_preferences",
]
