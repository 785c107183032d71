"""Symbolic answer equivalence with Hugging Face's `math-verify` (what TRL and open-r1 grade with).

`math_answer.answers_match` calls this only after its fast paths (exact
rationals, equal normalised strings) could not decide: for roots, symbolic
expressions (``x+1`` vs ``1+x``), intervals, tuples and sets, LaTeX our
normaliser does not read, multiple-choice letters written as ``\\text{(B)}``.

Both sides are answers already extracted by our conventions, so each is
wrapped in ``\\boxed{}`` and parsed with math-verify's LaTeX and plain
expression extractors; `verify` then compares them (numbers to 6 decimals,
sympy simplification, interval/set/tuple rules).

Time is bounded: math-verify stops parsing and comparing after
`TIMEOUT_SECONDS` each (a SIGALRM timer, so three steps take at most about
6 s on a pathological input like ``9^{9^{9^{9}}}``), and answers longer than
`MAX_CHARS` are not parsed at all. SIGALRM only exists on the main thread;
called from another thread the symbolic check is skipped (counted in
`SKIPPED_OFF_MAIN_THREAD`, logged once) rather than run without a bound.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

# Long enough for sympy to simplify an ordinary answer on a loaded host ((x+1)^2 vs x^2+2x+1 takes
# ~0.3 s on an idle CPU), short enough to bound a pathological one.
TIMEOUT_SECONDS = 2
# A final answer is short; longer "answers" are degenerate completions not worth a parse.
MAX_CHARS = 300
SKIPPED_OFF_MAIN_THREAD = 0


def _parse(answer: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(f"\\boxed{{{answer}}}", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=TIMEOUT_SECONDS)  # fmt: skip


def symbolic_match(predicted: str, expected: str) -> bool:
    """Whether math-verify finds `predicted` equivalent to `expected` (both cleaned answer strings).

    False when either side does not parse, when a step times out, or when
    an answer is longer than `MAX_CHARS`; never raises on bad input.
    """
    global SKIPPED_OFF_MAIN_THREAD
    if not predicted or not expected or len(predicted) > MAX_CHARS or len(expected) > MAX_CHARS:
        return False
    if threading.current_thread() is not threading.main_thread():
        if SKIPPED_OFF_MAIN_THREAD == 0:
            log.warning("math-verify needs the main thread for its timeouts; symbolic answer checks are skipped "
                        "off the main thread (numeric and string checks still run)")  # fmt: skip
        SKIPPED_OFF_MAIN_THREAD += 1
        return False
    from math_verify import verify

    gold, target = _parse(expected), _parse(predicted)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=TIMEOUT_SECONDS))
