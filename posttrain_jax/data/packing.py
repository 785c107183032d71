"""Rows of the batch contract: planning which examples share a row, and
building the row arrays.

Every row has five int32 arrays of length ``seq_len``:

- ``tokens``, ``targets``: an example ``x[0..n)`` is shifted *before*
  packing into tokens ``x[0..n-1)`` and targets ``x[1..n)``, so a target
  never comes from another example;
- ``loss_mask``: 1 where the target is trained;
- ``positions``: restart at 0 for each example;
- ``segment_ids``: 1, 2, 3, ... for the examples of the row, 0 for padding.

Padding positions are 0 in all five arrays. Packing (as in DeepSeek-V3 SFT)
puts several examples in a row, never splitting one; the model's attention
mask keeps them apart with `segment_ids`. Without packing each row holds one
example.

The plan is computed up front from the example lengths (known from the
tokenization pre-pass), rather than by a streaming packer, so the number of
rows is exact and the same on every host.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")

# First-fit keeps this many rows open: more rows fill better (fewer padding
# tokens) but move examples further from their place in the mixed order.
PACKING_WINDOW = 16


def plan_rows(lengths: np.ndarray, seq_len: int, *, packing: bool,
              window: int = PACKING_WINDOW) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Assign draws to rows. `lengths` are the shifted lengths (<= seq_len).

    Returns CSR arrays ``(row_offsets, row_draws)``: row ``r`` holds draws
    ``row_draws[row_offsets[r]:row_offsets[r + 1]]``, in stream order.
    Packing is first-fit over at most `window` open rows; a row is closed
    when it is full, or, the oldest one, when a draw fits none of them.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.max() > seq_len or lengths.min() < 1):
        raise ValueError(f"every shifted length must be in [1, {seq_len}]")
    if not packing:
        return np.arange(len(lengths) + 1, dtype=np.int64), np.arange(len(lengths), dtype=np.int64)
    closed: list[list[int]] = []
    open_rows: list[list[int]] = []  # draw indices per open row
    free: list[int] = []  # free positions per open row
    for draw, length in enumerate(lengths.tolist()):
        for slot, space in enumerate(free):
            if length <= space:
                open_rows[slot].append(draw)
                free[slot] -= length
                if free[slot] == 0:  # a full row only takes up the window
                    closed.append(open_rows.pop(slot))
                    free.pop(slot)
                break
        else:
            if len(open_rows) == window:
                closed.append(open_rows.pop(0))
                free.pop(0)
            open_rows.append([draw])
            free.append(seq_len - length)
    closed.extend(open_rows)
    row_offsets = np.zeros(len(closed) + 1, dtype=np.int64)
    np.cumsum([len(row) for row in closed], out=row_offsets[1:])
    row_draws = np.fromiter((d for row in closed for d in row), dtype=np.int64, count=len(lengths))
    return row_offsets, row_draws


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """An all-padding row (used to fill the last eval batch)."""
    return {key: np.zeros(seq_len, np.int32) for key in BATCH_KEYS}


def build_row(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """The row arrays for examples given as (ids, trained) pairs (unshifted)."""
    row = empty_row(seq_len)
    start = 0
    for segment, (ids, trained) in enumerate(examples, start=1):
        length = len(ids) - 1
        end = start + length
        if end > seq_len:
            raise ValueError(f"examples of {end} shifted tokens do not fit in a row of {seq_len}")
        row["tokens"][start:end] = ids[:-1]
        row["targets"][start:end] = ids[1:]
        row["loss_mask"][start:end] = trained[1:]
        row["positions"][start:end] = np.arange(length)
        row["segment_ids"][start:end] = segment
        start = end
    return row
