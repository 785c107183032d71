"""SFT train and eval pipelines: sources -> mixed, packed, per-host batches.

Steps: tokenize every source once (`examples.tokenize_source`), draw a
mixture order (`mixing.mixture_order`), plan rows (`packing.plan_rows`),
then serve the rows through grain: a random-access `grain.MapDataset` of
this host's rows, batched with ``drop_remainder`` and iterated with grain's
checkpointable iterator. The plan is the same on every host, so hosts get
disjoint rows and exactly the same number of batches (a host running out
early would hang the others in a collective).

Global batch ``b`` is rows ``[b * global_batch, (b + 1) * global_batch)`` of
the plan; host ``h`` serves the ``h``-th block of ``rows = global_batch //
process_count`` of them, which matches the process-major row order of a
global array made with `jax.make_array_from_process_local_data`. The
content of a global batch thus does not depend on the number of hosts, and
an iterator state (the batch index) can resume on another host count.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from posttrain_jax.data.examples import TokenizedSource, check_template, tokenize_source
from posttrain_jax.data.mixing import mixture_order, num_draws
from posttrain_jax.data.packing import build_row, empty_row, plan_rows
from posttrain_jax.data.stats import PipelineStats
from posttrain_jax.tokenizer import Tokenizer

_STATE_VERSION = 1


@dataclass(frozen=True)
class SourceSpec:
    """One data source of a mixture.

    path: a .jsonl/.jsonl.gz/.parquet file, a directory of them, or a glob.
    weight: the source's share of the stream while all sources have data
      left (relative to the other weights). None for every source means
      "proportional to examples x epochs" (concatenate and shuffle). Either
      all sources give a weight or none does.
    epochs: passes over the source; fractional values subsample (0.5) or
      upsample (2.5) it.
    name: label in the stats report (default: the path).
    normalize: ShareGPT rows: map role aliases (chatgpt, bing, bard, user,
      ...) and merge consecutive turns of one role instead of counting those
      rows as bad (see `posttrain_jax.data.sources`).
    """

    path: str | Path
    weight: float | None = None
    epochs: float = 1.0
    name: str | None = None
    normalize: bool = False


def _as_specs(sources) -> list[SourceSpec]:
    if isinstance(sources, (str, Path, SourceSpec, Mapping)):
        sources = [sources]
    specs = []
    for source in sources:
        if isinstance(source, Mapping):  # e.g. a config dict {"path": ..., "weight": ...}
            unknown = set(source) - {"path", "weight", "epochs", "name", "normalize"}
            if unknown:
                raise ValueError(f"unknown data source key(s) {sorted(unknown)}; valid: path, weight, epochs, name, "
                                 "normalize")
            source = SourceSpec(**source)
        elif not isinstance(source, SourceSpec):
            source = SourceSpec(path=source)
        specs.append(source)
    if not specs:
        raise ValueError("no data sources given")
    for spec in specs:
        if spec.weight is not None and not spec.weight > 0:
            raise ValueError(f"source {spec.path}: weight must be > 0, got {spec.weight} (remove the source to skip it)")
        if not spec.epochs > 0:
            raise ValueError(f"source {spec.path}: epochs must be > 0, got {spec.epochs}")
    if len({spec.weight is None for spec in specs}) > 1:
        raise ValueError("give a weight to every source or to none (None = proportional to examples x epochs)")
    return specs


def _host_layout(global_batch: int, process_index: int | None, process_count: int | None, *,
                 name: str = "global_batch") -> tuple[int, int, int]:  # fmt: skip
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(f"{name} {global_batch} must be a positive multiple of the {process_count} processes")
    return process_index, process_count, global_batch // process_count


class _Plan:
    """Which examples each global row holds; builds row arrays on demand."""

    def __init__(self, sources: list[TokenizedSource], draw_source: np.ndarray, draw_example: np.ndarray,
                 seq_len: int, packing: bool):  # fmt: skip
        self.sources, self.draw_source, self.draw_example = sources, draw_source, draw_example
        self.seq_len = seq_len
        lengths = [s.lengths - 1 for s in sources]  # shifted lengths
        starts = [s.offsets[:-1] for s in sources]
        loss = [
            np.add.reduceat(s.trained.astype(np.int64), st) - s.trained[st] if len(s) else np.zeros(0, np.int64)
            for s, st in zip(sources, starts)
        ]
        self.draw_length = np.zeros(len(draw_source), np.int64)
        self.draw_loss = np.zeros(len(draw_source), np.int64)
        for i in range(len(sources)):
            picked = draw_source == i
            self.draw_length[picked] = lengths[i][draw_example[picked]]
            self.draw_loss[picked] = loss[i][draw_example[picked]]
        self.row_offsets, self.row_draws = plan_rows(self.draw_length, seq_len, packing=packing)

    @property
    def num_rows(self) -> int:
        return len(self.row_offsets) - 1

    def draws_of_rows(self, start: int, stop: int) -> np.ndarray:
        """Draw indices held by rows [start, stop)."""
        return self.row_draws[self.row_offsets[start] : self.row_offsets[min(stop, self.num_rows)]]

    def row(self, index: int) -> dict[str, np.ndarray]:
        """Row arrays of global row `index`; all padding past the last row."""
        if index >= self.num_rows:
            return empty_row(self.seq_len)
        draws = self.draws_of_rows(index, index + 1)
        examples = [self.sources[self.draw_source[d]].example(self.draw_example[d]) for d in draws]
        return build_row(examples, self.seq_len)

    def fingerprint(self, *extra) -> str:
        """A short hash of the plan, so a saved state is only restored onto
        the pipeline that produced it."""
        h = hashlib.blake2b(repr(extra).encode(), digest_size=8)
        for array in (self.draw_source, self.draw_example, self.draw_length, self.row_offsets, self.row_draws):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()


class _HostRows:
    """grain random-access source: this host's rows, in batch order."""

    def __init__(self, plan: _Plan, num_batches: int, rows: int, process_index: int, process_count: int):
        self._plan, self._num_batches, self._rows = plan, num_batches, rows
        self._process_index, self._global_batch = process_index, rows * process_count

    def __len__(self) -> int:
        return self._num_batches * self._rows

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        batch, row = divmod(index, self._rows)
        return self._plan.row(batch * self._global_batch + self._process_index * self._rows + row)


class BatchIterator(grain.DatasetIterator):
    """Iterator over this host's batches: dicts of int32 ``[rows, seq_len]``
    arrays with keys `BATCH_KEYS`; StopIteration after `num_batches`.

    `get_state()` is a JSON-serialisable dict; `set_state()` on an iterator
    built from the same data and config resumes exactly, and refuses a state
    from a different pipeline. Being a grain `DatasetIterator`, it also
    works with ``grain.checkpoint.CheckpointHandler``.
    """

    def __init__(self, dataset: grain.IterDataset, *, num_batches: int, rows: int, seq_len: int,
                 global_batch: int, fingerprint: str, stats: PipelineStats):  # fmt: skip
        super().__init__(iter(dataset))
        self.num_batches, self.rows, self.seq_len, self.global_batch = num_batches, rows, seq_len, global_batch
        self.stats, self._fingerprint = stats, fingerprint
        self._initial_state = self._parent.get_state()

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict:
        """The position in the stream, as a JSON-serialisable dict."""
        return {"version": _STATE_VERSION, "fingerprint": self._fingerprint, "grain": self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        """Resume from a `get_state()` of an iterator over the same pipeline."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION or "grain" not in state:
            raise ValueError(f"not a data iterator state of this version ({_STATE_VERSION}): {state!r}")
        if state.get("fingerprint") != self._fingerprint:
            raise ValueError(
                f"the data iterator state was saved by a different pipeline (fingerprint {state.get('fingerprint')}, "
                f"this one is {self._fingerprint}): the data files, tokenizer, template, seq_len, global_batch, "
                "packing, seed or source weights/epochs changed. Restore with the original data config, or "
                "start the data stream from the beginning by not restoring its state."
            )
        self._parent.set_state(state["grain"])

    def reset(self) -> None:
        """Go back to the first batch (e.g. before each eval pass)."""
        self._parent.set_state(self._initial_state)

    def __str__(self) -> str:
        return f"BatchIterator(num_batches={self.num_batches}, rows={self.rows}, seq_len={self.seq_len})"


def _build(sources: list[TokenizedSource], specs: list[SourceSpec], *, seq_len: int, global_batch: int,
           packing: bool, seed: int, shuffle: bool, pad_last_batch: bool, process_index: int | None,
           process_count: int | None) -> tuple[BatchIterator, PipelineStats]:  # fmt: skip
    process_index, process_count, rows = _host_layout(global_batch, process_index, process_count)
    stats = PipelineStats(sources=[s.stats for s in sources], seq_len=seq_len, global_batch=global_batch,
                          packing=packing)  # fmt: skip
    # A source that contributes nothing is almost always a mistake (wrong
    # format, wrong column names), worth stopping for rather than training
    # for hours on the rest of the mixture.
    for source, spec in zip(sources, specs):
        if num_draws(len(source), spec.epochs) == 0:
            raise ValueError(
                f"source {source.stats.name} contributes no examples ({len(source)} usable examples x "
                f"{spec.epochs} epochs); fix or remove it:\n" + stats.report()
            )
    draw_source, draw_example = mixture_order(
        [len(s) for s in sources], epochs=[spec.epochs for spec in specs],
        weights=[spec.weight for spec in specs], seed=seed, shuffle=shuffle,
    )  # fmt: skip
    plan = _Plan(sources, draw_source, draw_example, seq_len, packing)
    if pad_last_batch:
        num_batches = -(-plan.num_rows // global_batch)
    else:
        num_batches = plan.num_rows // global_batch
        if num_batches == 0:
            raise ValueError(
                f"the data make {plan.num_rows} rows of {seq_len} tokens, fewer than one global batch of "
                f"{global_batch}; lower global_batch or add data:\n" + stats.report()
            )
    used_rows = min(num_batches * global_batch, plan.num_rows)
    used, dropped = plan.draws_of_rows(0, used_rows), plan.draws_of_rows(used_rows, plan.num_rows)
    for i, source_stats in enumerate(stats.sources):
        source_stats.draws = int(np.sum(draw_source == i))
        source_stats.dropped_remainder = int(np.sum(draw_source[dropped] == i))
    stats.rows, stats.batches = num_batches * global_batch, num_batches
    stats.padding_rows = stats.rows - used_rows
    stats.tokens, stats.loss_tokens = int(plan.draw_length[used].sum()), int(plan.draw_loss[used].sum())
    stats.padding_tokens = stats.rows * seq_len - stats.tokens

    dataset = grain.MapDataset.source(_HostRows(plan, num_batches, rows, process_index, process_count))
    dataset = dataset.batch(rows, drop_remainder=True)
    # A few batches of prefetch hide row building; grain's default (500
    # elements) would hold hundreds of batches in memory.
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    fingerprint = plan.fingerprint(_STATE_VERSION, seq_len, global_batch, packing, pad_last_batch)
    iterator = BatchIterator(iter_dataset, num_batches=num_batches, rows=rows, seq_len=seq_len,
                             global_batch=global_batch, fingerprint=fingerprint, stats=stats)  # fmt: skip
    return iterator, stats


def _tokenize_all(specs: list[SourceSpec], tokenizer: Tokenizer, **kwargs) -> list[TokenizedSource]:
    check_template(tokenizer, kwargs["template"])
    return [tokenize_source(spec.path, tokenizer, name=spec.name, normalize=spec.normalize, **kwargs)
            for spec in specs]


def make_sft_pipeline(sources, tokenizer: Tokenizer, *, template: str, seq_len: int, global_batch: int,
                      packing: bool = True, train_on: str = "assistant", length_policy: str = "truncate",
                      on_bad_row: str = "error", seed: int = 0, epochs: float | None = None,
                      process_index: int | None = None,
                      process_count: int | None = None) -> tuple[BatchIterator, PipelineStats]:  # fmt: skip
    """Build the SFT train pipeline: this host's batches and the data stats.

    sources: a `SourceSpec`, a path, a dict with SourceSpec's fields, or a
      list of them (a weighted mixture, see `SourceSpec`).
    template: a chat template of `posttrain_jax.tokenizer.CHAT_TEMPLATES`.
    seq_len, global_batch: each host yields ``[global_batch //
      process_count, seq_len]`` arrays (see `BatchIterator`).
    packing: several examples per row (True) or one, padded (False).
    train_on: "assistant" (assistant turns / the completion) or "all".
    length_policy: "truncate" or "drop" examples over ``seq_len + 1`` tokens.
    on_bad_row: "error" (raise, naming file and line) or "skip" (count).
    seed: shuffles each source and the mixture; same seed, same batches.
    epochs: if set, overrides every source's `epochs`.
    process_index, process_count: this host's place; default from jax.

    The iterator stops after ``num_batches``, when every source has used its
    epochs (the last partial global batch is dropped and counted).
    """
    specs = _as_specs(sources)
    if epochs is not None:
        specs = _as_specs([dataclasses.replace(spec, epochs=epochs) for spec in specs])
    tokenized = _tokenize_all(specs, tokenizer, template=template, seq_len=seq_len, train_on=train_on,
                              length_policy=length_policy, on_bad_row=on_bad_row)  # fmt: skip
    return _build(tokenized, specs, seq_len=seq_len, global_batch=global_batch, packing=packing, seed=seed,
                  shuffle=True, pad_last_batch=False, process_index=process_index,
                  process_count=process_count)  # fmt: skip


def make_eval_pipeline(sources, tokenizer: Tokenizer, *, template: str, seq_len: int, global_batch: int,
                       packing: bool = False, train_on: str = "assistant", length_policy: str = "truncate",
                       on_bad_row: str = "error", process_index: int | None = None,
                       process_count: int | None = None) -> tuple[BatchIterator, PipelineStats]:  # fmt: skip
    """Build an eval pipeline over held-out data: every example once, in file
    order, no shuffle; the last global batch is filled with all-zero rows
    (loss_mask 0) so shapes stay static. Call ``iterator.reset()`` before
    each pass. Arguments are as for `make_sft_pipeline`; sources take no
    weight or epochs.
    """
    specs = _as_specs(sources)
    for spec in specs:
        if spec.weight is not None or spec.epochs != 1:
            raise ValueError(f"eval source {spec.path}: eval reads every example once; drop weight and epochs")
    tokenized = _tokenize_all(specs, tokenizer, template=template, seq_len=seq_len, train_on=train_on,
                              length_policy=length_policy, on_bad_row=on_bad_row)  # fmt: skip
    return _build(tokenized, specs, seq_len=seq_len, global_batch=global_batch, packing=packing, seed=0,
                  shuffle=False, pad_last_batch=True, process_index=process_index,
                  process_count=process_count)  # fmt: skip
