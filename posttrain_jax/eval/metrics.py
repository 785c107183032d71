"""Evaluation statistics as pure functions of per-prompt counts (no model, no arrays on devices).

- pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language
  Models Trained on Code", eq. 1): from n samples of which c are correct,
  pass@k = 1 - C(n - c, k) / C(n, k), computed as the stable product
  1 - prod_{i = n-c+1}^{n} (1 - k / i).
- maj@k: majority voting (self-consistency, Wang et al. 2022) over the answers of
  the first k samples; a prompt counts as correct when the most frequent answer
  is a correct one (ties: the answer seen first). Samples without an answer do
  not vote; a prompt with no votes is wrong.
- win rate of A over B: mean over prompts of 1[score_A > score_B] + 0.5 x 1[tie]
  (AlpacaEval's convention for ties).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from posttrain_jax.rewards.math_answer import extract_answer, normalize_answer, parse_number


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021). Raises ValueError if k > n or c > n."""
    n, c = int(num_samples), int(num_correct)
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples (n = {n})")
    if not 0 <= c <= n:
        raise ValueError(f"{c} correct out of {n} samples")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def vote_key(completion: str, extract: str = "auto") -> str | None:
    """The answer a completion votes for: an exact rational for numbers ("1/2" == "0.5"), else the
    normalised string; None when no answer is found."""
    answer = extract_answer(completion, extract)
    if answer is None:
        return None
    number = parse_number(answer)
    if number is not None:
        value: Fraction = number[0]
        return f"#{value.numerator}/{value.denominator}" + ("%" if number[1] else "")
    key = normalize_answer(answer)
    return key or None


def majority_index(keys: Sequence[str | None]) -> int:
    """Index of the first sample whose answer is the most frequent one (-1: no sample has an answer)."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return -1
    best = max(counts.values())
    return min(first[key] for key, count in counts.items() if count == best)


def maj_at_k(keys: Sequence[str | None], correct: Sequence[bool], k: int) -> bool:
    """Is the majority answer of the first k samples correct? (its first occurrence's verdict)."""
    if not 1 <= k <= len(keys):
        raise ValueError(f"maj@{k} needs 1 <= k <= {len(keys)} samples")
    index = majority_index(keys[:k])
    return bool(index >= 0 and correct[index])


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> dict[str, float]:
    """Win rate of A over B on the same prompts: wins + ties / 2, over prompts; also wins, ties, losses."""
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or not a.size:
        raise ValueError(f"win rate needs two equally long, non-empty score lists, got {a.shape} and {b.shape}")
    wins, ties = float(np.mean(a > b)), float(np.mean(a == b))
    return {"win_rate": wins + 0.5 * ties, "wins": wins, "ties": ties, "losses": 1.0 - wins - ties}
