"""The order in which examples of several sources are drawn.

Source ``i`` with ``n_i`` examples and ``epochs_i`` contributes exactly
``round(n_i * epochs_i)`` draws: whole shuffled passes over its examples,
then (for a fractional epoch count) the start of one more shuffled pass, so
``epochs=0.5`` subsamples and ``epochs=3`` upsamples, as in the Tülu 3 and
Llama 3 data mixes.

The draws of all sources are interleaved by weight with stride scheduling:
draw ``j`` of source ``i`` gets the time ``(j + u) / weight_i`` with ``u``
uniform in [0, 1) (a random phase, so the interleaving is not a fixed
pattern), and the stream is all draws sorted by time. While every source has
draws left, source ``i`` makes up ``weight_i / sum(weights)`` of any stretch
of the stream, up to one draw per source; when a source runs out the others
continue at their relative weights, and the stream ends when all have run
out. A weight of None means ``weight_i = draws_i``: every source then runs
out at the same time and its share is constant (concatenate and shuffle).

The whole order is computed up front with numpy from the seed: it is cheap
(a sort of the draw count), identical on every host, and it is what lets
the packer plan exact, equal batch counts for all hosts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def num_draws(num_examples: int, epochs: float) -> int:
    """Draws a source of `num_examples` contributes with `epochs` passes."""
    return int(round(num_examples * epochs))


def _source_order(num_examples: int, draws: int, rng: np.random.Generator | None) -> np.ndarray:
    """Example indices of a source's draws: shuffled passes, or in file order."""
    passes = -(-draws // num_examples) if num_examples else 0
    if rng is None:
        return np.arange(draws, dtype=np.int64) % max(num_examples, 1)
    return np.concatenate([rng.permutation(num_examples) for _ in range(passes)] or [np.zeros(0, np.int64)])[:draws]


def mixture_order(num_examples: Sequence[int], *, epochs: Sequence[float], weights: Sequence[float | None],
                  seed: int, shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The draw order of a mixture: (source index, example index) per draw.

    Deterministic given `seed`. With shuffle=False, each source is read in
    file order and the interleaving has no random phase (for eval).
    """
    if not (len(num_examples) == len(epochs) == len(weights)):
        raise ValueError("num_examples, epochs and weights must have one entry per source")
    sources, examples, times = [], [], []
    for i, (count, epoch_count, weight) in enumerate(zip(num_examples, epochs, weights)):
        draws = num_draws(count, epoch_count)
        if draws == 0:
            continue
        # One generator per source, so adding a source does not reshuffle the others.
        rng = np.random.default_rng([seed, i]) if shuffle else None
        examples.append(_source_order(count, draws, rng))
        sources.append(np.full(draws, i, dtype=np.int32))
        phase = rng.random(draws) if shuffle else np.full(draws, 0.5)
        times.append((np.arange(draws) + phase) / (draws if weight is None else weight))
    if not sources:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    order = np.argsort(np.concatenate(times), kind="stable")
    return np.concatenate(sources)[order], np.concatenate(examples)[order]
