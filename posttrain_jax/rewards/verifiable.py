"""Rule-based rewards: math answers (RLVR), normalised exact match, output format.

Each factory returns a `PerSampleReward` (the one calling convention of
`posttrain_jax.rewards.compose`). The ground truth is read from the sample's
dataset row under `answer_key`; a row without it is an error naming the key
and the keys the row has, never a silent 0. A ground truth may be a string, a
number or a list of acceptable answers.

Scores follow the recipes they come from: Tülu 3's RLVR gives 10 for a
verified answer and 0 otherwise (`math_reward` defaults); DeepSeek-R1 adds a
format reward for ``<think>...</think><answer>...</answer>``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from posttrain_jax.rewards.compose import PerSampleReward
from posttrain_jax.rewards.math_answer import EXTRACT_MODES, answers_match, extract_answer, normalize_answer

# DeepSeek-R1's output format: reasoning in <think>, the final answer in <answer>.
R1_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"
FORMAT_MODES = ("fullmatch", "search", "match")


def _check_scores(correct: float, incorrect: float, names: tuple[str, str] = ("correct", "incorrect")) -> None:
    for name, value in zip(names, (correct, incorrect)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if correct == incorrect:
        # Accuracy counts samples scored `correct`; equal scores would make every sample "correct".
        raise ValueError(f"{names[0]} and {names[1]} scores must differ, both are {correct}")


def _check_extract(extract: str) -> None:
    if extract not in EXTRACT_MODES:
        raise ValueError(f"unknown extract mode {extract!r}; valid modes: {', '.join(EXTRACT_MODES)}")


def _ground_truth(row: Mapping, answer_key: str):
    if not isinstance(row, Mapping):
        raise TypeError(f"a dataset row must be a dict, got {type(row).__name__}")
    if answer_key not in row:
        raise KeyError(f"the dataset row has no ground truth under {answer_key!r} (set answer_key); "
                       f"its keys: {sorted(row)}")
    return row[answer_key]


def math_reward(*, correct: float = 10.0, incorrect: float = 0.0, answer_key: str = "answer",
                extract: str = "auto", rel_tol: float = 1e-6) -> PerSampleReward:
    """`correct` if the completion's final answer equals ``row[answer_key]``, else `incorrect`.

    The answer is found by `extract` (see `math_answer.extract_answer`:
    "auto", "boxed", "gsm8k", "answer_is", "last_number", "answer_tag") and
    compared by `math_answer.answers_match` (numbers as exact rationals
    within `rel_tol`, else normalised strings). No answer found scores
    `incorrect`. Verifiable: accuracy counts samples scored `correct`.
    """
    _check_scores(correct, incorrect)
    _check_extract(extract)
    if rel_tol < 0:
        raise ValueError(f"rel_tol must be >= 0, got {rel_tol}")

    def score_one(completion: str, prompt, row: Mapping) -> float:
        expected = _ground_truth(row, answer_key)
        found = answers_match(extract_answer(completion, extract), expected, rel_tol=rel_tol)
        return correct if found else incorrect

    return PerSampleReward(score_one, correct_score=float(correct))


def exact_match_reward(*, correct: float = 1.0, incorrect: float = 0.0, answer_key: str = "answer",
                       extract: str = "none", case_sensitive: bool = False) -> PerSampleReward:  # fmt: skip
    """`correct` if the extracted answer equals ``row[answer_key]`` as normalised strings, else `incorrect`.

    Normalisation removes LaTeX presentation and all whitespace (see
    `math_answer.normalize_answer`) and, unless `case_sensitive`, case. With
    the default extract="none" the whole completion is the answer. A list
    ground truth accepts any of its answers. Verifiable.
    """
    _check_scores(correct, incorrect)
    _check_extract(extract)

    def normalize(text: str) -> str:
        text = normalize_answer(text)
        return text if case_sensitive else text.casefold()

    def score_one(completion: str, prompt, row: Mapping) -> float:
        expected = _ground_truth(row, answer_key)
        options = expected if isinstance(expected, (list, tuple)) else [expected]
        found = extract_answer(completion, extract)
        match = found is not None and normalize(found) in {normalize(str(o)) for o in options}
        return correct if match else incorrect

    return PerSampleReward(score_one, correct_score=float(correct))


def format_reward(*, pattern: str = R1_FORMAT, value: float = 1.0, otherwise: float = 0.0,
                  mode: str = "fullmatch", dotall: bool = True, strip: bool = True) -> PerSampleReward:  # fmt: skip
    """`value` if the completion matches the regex `pattern`, else `otherwise`.

    `mode`: "fullmatch" (the whole completion, default: DeepSeek-R1's
    ``<think>...</think>\\s*<answer>...</answer>`` and nothing else),
    "search" (anywhere) or "match" (at the start). `dotall` lets "." cross
    newlines; `strip` ignores surrounding whitespace. Not verifiable (no
    accuracy metric).
    """
    if mode not in FORMAT_MODES:
        raise ValueError(f"unknown format mode {mode!r}; valid modes: {', '.join(FORMAT_MODES)}")
    _check_scores(value, otherwise, ("value", "otherwise"))
    try:
        regex = re.compile(pattern, re.DOTALL if dotall else 0)
    except re.error as e:
        raise ValueError(f"format reward pattern {pattern!r} is not a valid regex: {e}") from e
    matcher = getattr(regex, mode)

    def score_one(completion: str, prompt, row: Mapping) -> float:
        return value if matcher(completion.strip() if strip else completion) else otherwise

    return PerSampleReward(score_one)
