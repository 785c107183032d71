"""SFT data: local JSONL / JSON / Parquet / ShareGPT / HF datasets sources -> mixed, packed, per-host batches.

Sources and row formats are described in `posttrain_jax.data.sources`.

Typical use::

    from posttrain_jax.data import SourceSpec, make_sft_pipeline, make_eval_pipeline

    train, stats = make_sft_pipeline(
        [SourceSpec("tulu.parquet", weight=3.0), SourceSpec("math.jsonl", weight=1.0, epochs=2)],
        tokenizer, template="llama3", seq_len=4096, global_batch=128, seed=0)
    for batch in train:          # this host's [global_batch // process_count, seq_len] arrays
        ...
    state = train.get_state()    # JSON-serialisable; train.set_state(state) resumes exactly
    print(stats.report())        # what was kept, truncated, dropped or skipped, per source

Batch contract (all int32, shape ``[rows, seq_len]``, see `packing`):
``tokens``, ``targets`` (next token of the same example, 0 where none),
``loss_mask`` (1 where ``targets`` is trained), ``positions`` (restart at 0
per example) and ``segment_ids`` (1, 2, ... per example in a row, 0 for
padding; padding is 0 in every array).

Public API:

- `SourceSpec(path, weight=None, epochs=1.0, name=None, normalize=False)`: a source of a mixture
  (`normalize`: ShareGPT role aliases and merged turns).
- `make_sft_pipeline(sources, tokenizer, *, template, seq_len, global_batch,
  packing=True, train_on="assistant", length_policy="truncate",
  on_bad_row="error", seed=0, epochs=None, process_index=None,
  process_count=None) -> (BatchIterator, PipelineStats)`.
- `make_eval_pipeline(sources, tokenizer, *, template, seq_len, global_batch,
  packing=False, ...) -> (BatchIterator, PipelineStats)`: every example
  once, last batch padded with all-zero rows; ``reset()`` before each pass.
- `BatchIterator`: a grain `DatasetIterator` with ``num_batches``,
  ``rows``, ``seq_len``, ``global_batch``, ``stats``, ``get_state()``,
  ``set_state(state)``, ``reset()``.
- `PipelineStats` / `SourceStats`: counts, ``report()``, ``to_dict()``.
- `DataError`: a malformed file or row, naming file:line (Parquet: row).
- `synthetic`: arithmetic word problems and a SentencePiece tokenizer for
  the quickstart (`synthetic.make_quickstart_data`).
"""

from posttrain_jax.data.packing import BATCH_KEYS
from posttrain_jax.data.pipeline import BatchIterator, SourceSpec, make_eval_pipeline, make_sft_pipeline
from posttrain_jax.data.sources import DataError
from posttrain_jax.data.stats import PipelineStats, SourceStats

__all__ = [
    "BATCH_KEYS",
    "BatchIterator",
    "DataError",
    "PipelineStats",
    "SourceSpec",
    "SourceStats",
    "make_eval_pipeline",
    "make_sft_pipeline",
]

# Preference data (reward models, DPO): see `posttrain_jax.data.preference`.
from posttrain_jax.data.preference import (  # noqa: E402
    PREFERENCE_BATCH_KEYS,
    STRENGTHS,
    PreferenceBatchIterator,
    PreferenceStats,
    make_preference_eval_pipeline,
    make_preference_pipeline,
    write_arithmetic_preferences,
)
from posttrain_jax.data.preference_rows import PreferenceSourceStats  # noqa: E402

__all__ += [
    "PREFERENCE_BATCH_KEYS",
    "STRENGTHS",
    "PreferenceBatchIterator",
    "PreferenceSourceStats",
    "PreferenceStats",
    "batch_sequence_ids",
    "make_preference_eval_pipeline",
    "make_preference_pipeline",
    "pair_sums",
    "write_arithmetic_preferences",
]
