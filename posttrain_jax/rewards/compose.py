"""One calling convention for reward functions, and their weighted composition.

Every reward function is called as::

    fn(completions: list[str], *, prompts: list, rows: list[dict]) -> list[float]

where ``prompts[i]`` is the prompt of sample i (a string or a list of chat
messages) and ``rows[i]`` its dataset row (which holds e.g. the ground
truth). Batch-level calls let a reward model run batched forwards; rule-based
rewards score sample by sample through `PerSampleReward`.

`Rewards` combines named, weighted functions (GRPO's reward_funcs /
reward_weights): it returns the weighted total per sample *and* each
function's raw scores, so a trainer can log the mean/std per function and,
for verifiable functions (those with a `correct_score`), the accuracy (the
fraction of samples that got the correct score). A weight of 0 logs a
function without training on it.

A reward function that fails does not silently score 0: a zero would be a
plausible-looking reward and would bias training without anyone noticing.
`Rewards` raises `RewardError` naming the function, the failing sample and a
truncated prompt and completion, chained from the original exception. So do a
wrong number of scores and non-numeric or non-finite scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

RewardFn = Callable[..., Sequence[float]]
_PREVIEW_CHARS = 200


def preview(value, limit: int = _PREVIEW_CHARS) -> str:
    """A short repr of a prompt or completion for error messages (a chat prompt shows its last message)."""
    if isinstance(value, Sequence) and not isinstance(value, str) and value and isinstance(value[-1], Mapping):
        value = f"[{len(value)} messages] ... {value[-1].get('role', '?')}: {value[-1].get('content', '')}"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]} ({len(text)} chars)"


class RewardError(RuntimeError):
    """A reward function failed or returned bad scores; names the function and, when known, the sample."""

    def __init__(self, reward: str, message: str, *, index: int | None = None, prompt=None,
                 completion: str | None = None, num_samples: int | None = None):  # fmt: skip
        self.reward, self.index = reward, index
        where = "" if index is None else f" on sample {index}" + ("" if num_samples is None else f" of {num_samples}")
        lines = [f"reward function {reward!r} failed{where}: {message}"]
        if index is not None:
            lines += [f"  prompt: {preview(prompt)}", f"  completion: {preview(completion)}"]
        super().__init__("\n".join(lines))


class SampleError(RuntimeError):
    """Raised by `PerSampleReward` when scoring one sample fails; carries the sample index
    (the original exception is its __cause__)."""

    def __init__(self, index: int, error: BaseException):
        self.index = index
        super().__init__(f"sample {index}: {type(error).__name__}: {error}")


@dataclass(frozen=True)
class PerSampleReward:
    """A batch reward function built from ``score_one(completion, prompt, row) -> float``.

    `correct_score` marks a verifiable reward: a sample scored exactly that
    is counted as correct in the accuracy metric.
    """

    score_one: Callable[[str, object, Mapping], float]
    correct_score: float | None = None

    def __call__(self, completions: Sequence[str], *, prompts: Sequence, rows: Sequence[Mapping]) -> list[float]:
        scores = []
        for i, (completion, prompt, row) in enumerate(zip(completions, prompts, rows, strict=True)):
            try:
                scores.append(float(self.score_one(completion, prompt, row)))
            except Exception as e:
                raise SampleError(i, e) from e
        return scores


@dataclass(frozen=True)
class RewardTerm:
    """One named, weighted reward function; `correct_score` defaults to the function's own."""

    name: str
    fn: RewardFn
    weight: float = 1.0
    correct_score: float | None = None


@dataclass(frozen=True)
class RewardOutput:
    """Scores of one batch: `total` [n] weighted sum; `scores[name]` [n] raw scores of each function;
    `correct[name]` [n] bool for verifiable functions."""

    total: np.ndarray
    scores: dict[str, np.ndarray]
    correct: dict[str, np.ndarray] = field(default_factory=dict)

    def metrics(self, prefix: str = "rewards") -> dict[str, float]:
        """Mean/std of the total and of each function's raw scores, and accuracy of the verifiable ones."""
        out = {f"{prefix}/total/mean": float(np.mean(self.total)), f"{prefix}/total/std": float(np.std(self.total))}
        for name, scores in self.scores.items():
            out[f"{prefix}/{name}/mean"] = float(np.mean(scores))
            out[f"{prefix}/{name}/std"] = float(np.std(scores))
            if name in self.correct:
                out[f"{prefix}/{name}/accuracy"] = float(np.mean(self.correct[name]))
        return out


def _as_term(entry) -> RewardTerm:
    if isinstance(entry, RewardTerm):
        term = entry
    elif isinstance(entry, tuple) and len(entry) in (2, 3):
        term = RewardTerm(*entry)
    else:
        raise TypeError(f"a reward entry is a RewardTerm or a (name, fn, weight) tuple, got {entry!r}")
    if not callable(term.fn):
        raise TypeError(f"reward {term.name!r}: {term.fn!r} is not callable")
    if not isinstance(term.weight, (int, float)) or not math.isfinite(term.weight):
        raise ValueError(f"reward {term.name!r}: weight must be a finite number, got {term.weight!r}")
    correct = term.correct_score if term.correct_score is not None else getattr(term.fn, "correct_score", None)
    return RewardTerm(term.name, term.fn, float(term.weight), correct)


class Rewards:
    """Named, weighted reward functions called with the one convention; see the module docstring."""

    def __init__(self, entries: Sequence[RewardTerm | tuple]):
        self.terms = tuple(_as_term(e) for e in entries)
        if not self.terms:
            raise ValueError("Rewards needs at least one reward function")
        names = [t.name for t in self.terms]
        if duplicates := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"reward names must be unique (they name the metrics); repeated: {duplicates}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.terms)

    @property
    def weights(self) -> dict[str, float]:
        return {t.name: t.weight for t in self.terms}

    @property
    def verifiable(self) -> dict[str, float]:
        """Name -> correct score of the functions whose accuracy is measured."""
        return {t.name: t.correct_score for t in self.terms if t.correct_score is not None}

    def __repr__(self) -> str:
        return "Rewards(" + ", ".join(f"{t.name}*{t.weight:g}" for t in self.terms) + ")"

    def __call__(self, completions: Sequence[str], *, prompts: Sequence, rows: Sequence[Mapping]) -> RewardOutput:
        completions, prompts, rows = list(completions), list(prompts), list(rows)
        if not len(completions) == len(prompts) == len(rows):
            raise ValueError(f"rewards need one prompt and one row per completion; got {len(completions)} "
                             f"completions, {len(prompts)} prompts, {len(rows)} rows")
        n = len(completions)
        total = np.zeros(n, np.float64)
        scores, correct = {}, {}
        for term in self.terms:
            raw = _call(term, completions, prompts, rows)
            scores[term.name] = raw
            total += term.weight * raw
            if term.correct_score is not None:
                correct[term.name] = raw == term.correct_score
        return RewardOutput(total=total, scores=scores, correct=correct)


def _call(term: RewardTerm, completions: list[str], prompts: list, rows: list) -> np.ndarray:
    n = len(completions)

    def error(message, index=None):
        return RewardError(term.name, message, index=index, num_samples=n,
                           prompt=None if index is None else prompts[index],
                           completion=None if index is None else completions[index])

    try:
        result = term.fn(completions, prompts=prompts, rows=rows)
    except SampleError as e:
        raise error(f"{type(e.__cause__).__name__}: {e.__cause__}", e.index) from e.__cause__
    except Exception as e:
        index, cause = _locate_failure(term.fn, completions, prompts, rows)
        if index is None:
            raise error(f"{type(e).__name__}: {e} (on the whole batch of {n}; no single sample fails alone)") from e
        raise error(f"{type(cause).__name__}: {cause}", index) from cause
    try:
        result = list(result)
    except TypeError:
        raise error(f"returned {type(result).__name__}, not a list of {n} scores") from None
    if len(result) != n:
        raise error(f"returned {len(result)} scores for {n} completions")
    values = np.empty(n, np.float64)
    for i, value in enumerate(result):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise error(f"score {value!r} ({type(value).__name__}) is not a number", i)
        if not math.isfinite(value):
            raise error(f"score {value} is not finite", i)
        values[i] = value
    return values


def _locate_failure(fn, completions, prompts, rows):
    """Re-run a batch function one sample at a time to find the first sample that fails alone.

    Only on the error path, so a working batch pays nothing; returns (None, None)
    when every sample passes alone (the failure needs the whole batch).
    """
    for i in range(len(completions)):
        try:
            fn(completions[i:i + 1], prompts=prompts[i:i + 1], rows=rows[i:i + 1])
        except SampleError as e:
            return i, e.__cause__
        except Exception as e:
            return i, e
    return None, None
