"""Final-answer extraction and answer equivalence for verifiable math rewards.

Two steps, each a pure function of strings:

1. `extract_answer(text, mode)` finds the final answer in a completion:
   ``\\boxed{...}`` / ``\\fbox{...}`` (the last one; nested braces; the
   ``\\boxed 5`` form), GSM8K's ``#### 42``, "The answer is X" / "Answer: X",
   or the last number in the text; or the content of DeepSeek-R1's
   ``<answer>`` tag. Mode "auto" tries boxed -> gsm8k -> answer-is ->
   last number, the order used by the
   Qwen2.5-Math and open-instruct graders: an explicit final-answer marker
   beats a number that merely comes last.
2. `answers_match(predicted, ground_truth, rel_tol)` decides equivalence.
   Both sides are cleaned of presentation (``$...$``, ``\\text{}``,
   ``\\left``/``\\right``, ``\\dfrac``, thin spaces, a trailing period,
   markdown bold, unicode minus). If both parse as numbers they are compared
   as exact rationals (so "3.0" == "3", "\\frac{1}{2}" == "0.5" == "1/2",
   "1,000" == "1000", "1e3" == "1000") within a relative tolerance; a
   percent sign on one side only also allows value/100 ("50%" == "0.5", and
   "50%" == "50" as in MATH's grader, which strips "\\%"). Equal cleaned
   strings (whitespace removed) match. Anything else goes to Hugging Face's
   `math-verify` (`posttrain_jax.rewards.symbolic`): roots, symbolic
   expressions, intervals, tuples, sets, choice letters, with bounded time.

The fast paths decide most answers without sympy. Learned from the
Hendrycks MATH ``strip_string``, Minerva's ``normalize_final_answer`` (as in
open-instruct's ``math_utils.py``), open-instruct's GSM8K verifier and the
Qwen2.5-Math grader; written independently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

# No numeric answer is this long; the cap bounds the work spent on degenerate completions.
_MAX_NUMBER_CHARS = 500
EXTRACT_MODES = ("auto", "boxed", "gsm8k", "answer_is", "last_number", "answer_tag", "none")

_UNICODE_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\uff0d": "-"})

# A number as it appears in prose: optional sign, thousands groups or plain
# digits, decimals, exponent, an optional "/denominator" or "\times 10^{k}";
# or a LaTeX fraction (so "$\frac{1}{2}$" is not read as "2"). The lookbehind
# stops a match from starting inside another number or word ("x2", "1.5").
_NUMBER_IN_TEXT = re.compile(
    r"(?<![\w.])[-+]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
    r"(?:/\d+(?!\d)|\s*(?:\\times|\\cdot)\s*10\s*\^\s*(?:\{\s*[-+]?\d+\s*\}|[-+]?\d+))?"
    r"|-?\\[dt]?frac(?:\{[^{}]*\}\{[^{}]*\}|\d\d)")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_BRACED = r"\{\s*([^{}]*?)\s*\}"
_FRAC = re.compile(r"(-?)\\frac" + _BRACED + _BRACED)
_FRAC_SHORT = re.compile(r"(-?)\\frac(\d)(\d)")  # \frac12 = 1/2
_SLASH = re.compile(r"(-?[^/]+)/([^/]+)")
_TIMES_TEN = re.compile(r"(.+?)\s*(?:\\times|\\cdot|\*|x)\s*10\s*\^\s*(?:\{\s*([-+]?\d+)\s*\}|([-+]?\d+))")
# Words after a number ("18 dollars", "5 cm") are units; digits are not.
_UNITS = re.compile(r"(.*?\d\.?)\s+[^\W\d_][^\d]*")
_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"(?:final\s+)?answer\s*(?:is|:|=)\s*:?\s*", re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


# --------------------------------------------------------------------------- extraction


def _braced_argument(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at text[start] == "{" (nesting allowed) and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None  # unbalanced: the completion was cut off inside the box


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces kept), or of
    ``\\boxed 5`` (up to whitespace or ``$``); None if there is none or it is unclosed/empty."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text)]
    if not starts:
        return None
    after = starts[-1].end()
    rest = text[after:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        found = _braced_argument(text, after + len(rest) - len(stripped))
        content = found[0] if found else None
    elif rest[:1].isspace():
        content = re.match(r"[^\s$]*", stripped).group(0)
    else:
        content = None
    content = content.strip() if content is not None else None
    return content or None


def extract_gsm8k(text: str) -> str | None:
    """The rest of the line after the last ``####`` (GSM8K's answer marker) that holds a number.

    GSM8K answers are numbers; requiring one skips markdown headings
    ("#### Step 1: ...") that chat models write before their answer.
    """
    # Only a line's last marker can be followed by a number (text after an
    # earlier one contains "####"), so each line is parsed once: linear time.
    for line in reversed(text.splitlines()):
        if "####" in line:
            answer = line.rsplit("####", 1)[1].strip()
            if answer and parse_number(answer) is not None:
                return answer
    return None


def _cut_sentence(answer: str) -> str:
    # Stop at the end of the sentence: a period followed by whitespace or the
    # end ("42. I hope it is correct."), but not a decimal point ("3.5").
    answer = answer.split("\n", 1)[0]
    match = re.search(r"\.(?:\s|$)", answer)
    return (answer[:match.start()] if match else answer).strip()


# Where an answer stated in prose ends: ", in total", "; so", " because ...".
_CLAUSE_END = re.compile(r",\s|;|\s(?:so|because|since|which|as|and|for|in|per|each)\s", re.IGNORECASE)


def _leading_answer(sentence: str) -> str | None:
    """The answer at the start of a sentence that goes on in prose: its first ``$...$`` math, or
    the clause before the first ", " / ";" / " because ..." when that clause is a number."""
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)")):
        if sentence.startswith(left) and (end := sentence.find(right, len(left))) > len(left):
            return sentence[:end + len(right)]
    head = _CLAUSE_END.split(sentence, maxsplit=1)[0].strip()
    return head if head and head != sentence and parse_number(head) is not None else None


def extract_answer_is(text: str) -> str | None:
    """The answer after the last "answer is" / "answer:" / "final answer is" (case-insensitive),
    up to the end of its sentence; a ``\\boxed{}`` inside it wins. When the sentence goes on in
    prose ("The answer is 72, in total, so ..."), its leading number or ``$...$`` math."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    first_line = rest.split("\n", 1)[0]
    if "\\boxed" in first_line or "\\fbox" in first_line:
        return extract_boxed(first_line)
    answer = _cut_sentence(rest)
    if answer and parse_number(answer) is None:
        answer = _leading_answer(answer) or answer
    return answer or None


# LaTeX thousands separators: "9{,}500", "9\\,500" (a thin space between digit groups).
_LATEX_THOUSANDS = re.compile(r"(?<=\d)(?:\{,\}|\\,)(?=\d{3}(?!\d))")


def extract_last_number(text: str) -> str | None:
    """The last number in the text ("1,234", "9{,}500", "-3", "0.5", "1e-3", "3/4"), or None."""
    found = _NUMBER_IN_TEXT.findall(_LATEX_THOUSANDS.sub(",", text.translate(_UNICODE_MINUS)))
    return found[-1] if found else None


def extract_answer_tag(text: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` (DeepSeek-R1 format): its boxed or
    "answer is" answer if it has one, else all of it."""
    tags = _ANSWER_TAG.findall(text)
    if not tags:
        return None
    return extract_boxed(tags[-1]) or extract_answer_is(tags[-1]) or tags[-1].strip() or None


def extract_answer(text: str, mode: str = "auto") -> str | None:
    """The final answer in `text` by `mode` (one of `EXTRACT_MODES`), or None if none is found.

    "auto" tries boxed -> gsm8k -> answer_is -> last_number; "none" returns
    the whole text stripped (for exact-match tasks).
    """
    if mode == "auto":
        for extract in (extract_boxed, extract_gsm8k, extract_answer_is, extract_last_number):
            if (answer := extract(text)) is not None:
                return answer
        return None
    if mode == "none":
        return text.strip() or None
    extractors = {"boxed": extract_boxed, "gsm8k": extract_gsm8k, "answer_is": extract_answer_is,
                  "last_number": extract_last_number, "answer_tag": extract_answer_tag}
    if mode not in extractors:
        raise ValueError(f"unknown answer extraction mode {mode!r}; valid modes: {', '.join(EXTRACT_MODES)}")
    return extractors[mode](text)


def ground_truth_answer(ground_truth) -> str:
    """A dataset's ground truth as an answer string: numbers as text; a full solution with a
    ``\\boxed{}`` (MATH) or ``#### x`` (GSM8K) reduced to that answer; other strings as they are."""
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float, Fraction)):
        raise TypeError(f"a ground-truth answer must be a string or a number, got {type(ground_truth).__name__} "
                        f"{ground_truth!r}")
    if not isinstance(ground_truth, str):
        return repr(ground_truth) if isinstance(ground_truth, float) else str(ground_truth)
    return extract_boxed(ground_truth) or extract_gsm8k(ground_truth) or ground_truth


# --------------------------------------------------------------------------- normalisation


def _unwrap(text: str) -> str:
    """Remove presentation that never changes an answer's value, outside in."""
    text = text.translate(_UNICODE_MINUS).strip()
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip("*`").strip()  # markdown bold / code
        text = text.rstrip(".").rstrip()  # sentence-final period: "42." is 42
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
                text = text[len(left):len(text) - len(right)]
        if text.startswith(("\\boxed", "\\fbox")) and (boxed := extract_boxed(text)) is not None:
            text = boxed
    return text


def clean_answer(text: str) -> str:
    """An answer with its LaTeX presentation removed (see the module docstring), whitespace kept."""
    text = _unwrap(text)
    text = _WRAPPERS.sub(r"\1", text)
    text = re.sub(r"\\(?:left|right)(?![A-Za-z])\s*", "", text)
    text = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", text)
    text = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", text)  # degrees
    for spacing in ("\\!", "\\,", "\\;", "\\:", "\\ ", "~"):
        text = text.replace(spacing, " ")
    text = _LATEX_THOUSANDS.sub(",", text)
    text = text.replace("{,}", ",").replace("\\$", "").replace("$", "").replace("\\%", "%")
    # "x = 5", "k=5": a short left-hand side names the answer; keep the value.
    parts = text.split("=")
    if len(parts) == 2 and len(parts[0].strip()) <= 2:
        text = parts[1]
    return _unwrap(text)


def normalize_answer(text: str) -> str:
    """`clean_answer` with all whitespace removed: the string compared when an answer is not numeric."""
    return re.sub(r"\s+", "", clean_answer(text))


def _plain_number(text: str) -> Fraction | None:
    text = text.strip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if _PLAIN_NUMBER.fullmatch(text):
        return Fraction(text)
    return None


def _braced_number(text: str) -> Fraction | None:
    # A numerator/denominator may itself be braced or signed: \frac{-1}{2}, {1}/{2}.
    text = text.strip()
    while text.startswith("{") and text.endswith("}"):
        text = text[1:-1].strip()
    return _plain_number(text)


def _ratio(sign: str, numerator: str, denominator: str) -> Fraction | None:
    top, bottom = _braced_number(numerator), _braced_number(denominator)
    if top is None or bottom is None or bottom == 0:
        return None
    return -top / bottom if sign else top / bottom


def parse_number(text: str) -> tuple[Fraction, bool] | None:
    """(exact value, has a percent sign) of a numeric answer, or None if it is not a number.

    Accepts integers, decimals, thousands separators, a leading "+",
    scientific notation ("1e-3", "1.5 \\times 10^{-3}"), ``\\frac{a}{b}``
    (``\\dfrac``, ``\\frac12``), "a/b", a trailing "%", and trailing unit
    words ("18 dollars").
    """
    if len(text) > _MAX_NUMBER_CHARS:
        return None
    text = clean_answer(text)
    percent = text.endswith("%")
    text = text.rstrip("%").strip()
    if "=" in text:  # "12 + 7 = 19": a numeric answer's value is what it equals
        text = text.rsplit("=", 1)[1].strip()
    if text.startswith("+"):
        text = text[1:].lstrip()
    if (units := _UNITS.fullmatch(text)) is not None:
        text = units.group(1).rstrip(".")
    value = _plain_number(text)
    if value is None and (m := _FRAC.fullmatch(text) or _FRAC_SHORT.fullmatch(text)):
        value = _ratio(*m.groups())
    if value is None and (m := _SLASH.fullmatch(text)):
        value = _ratio("", *m.groups())
    if value is None and (m := _TIMES_TEN.fullmatch(text)):
        mantissa = _plain_number(m.group(1))
        if mantissa is not None:
            value = mantissa * Fraction(10) ** int(m.group(2) or m.group(3))
    return None if value is None else (value, percent)


# --------------------------------------------------------------------------- equivalence


def _close(a: Fraction, b: Fraction, rel_tol: float) -> bool:
    # Exact rational arithmetic: no overflow for 1e400, no float rounding for 0.1;
    # the tolerance as written in decimal (1e-6 exactly, not its binary float).
    return a == b or abs(a - b) <= Fraction(repr(float(rel_tol))) * max(abs(a), abs(b))


def numbers_match(predicted: tuple[Fraction, bool], expected: tuple[Fraction, bool], rel_tol: float) -> bool:
    """Whether two parsed numbers are equal within `rel_tol`; a "%" on one side also allows value/100."""
    (p, p_percent), (e, e_percent) = predicted, expected
    if _close(p, e, rel_tol):
        return True
    if p_percent and not e_percent:
        return _close(p / 100, e, rel_tol)
    if e_percent and not p_percent:
        return _close(p, e / 100, rel_tol)
    return False


def answers_match(predicted: str | None, ground_truth, *, rel_tol: float = 1e-6, symbolic: bool = True) -> bool:
    """Whether an extracted answer equals the ground truth (a string, a number, or a list of
    acceptable answers); None (no answer found) never matches.

    Two numbers are decided exactly (within `rel_tol`); equal normalised
    strings match; otherwise, with `symbolic`, math-verify decides
    (`posttrain_jax.rewards.symbolic`, time-bounded)."""
    if predicted is None:
        return False
    if rel_tol < 0:
        raise ValueError(f"rel_tol must be >= 0, got {rel_tol}")
    if isinstance(ground_truth, Sequence) and not isinstance(ground_truth, str):
        if not ground_truth:
            raise ValueError("the list of acceptable ground-truth answers is empty")
        return any(answers_match(predicted, g, rel_tol=rel_tol, symbolic=symbolic) for g in ground_truth)
    expected = ground_truth_answer(ground_truth)
    predicted_number, expected_number = parse_number(predicted), parse_number(expected)
    if predicted_number is not None and expected_number is not None:
        return numbers_match(predicted_number, expected_number, rel_tol)
    normalized = normalize_answer(predicted)
    if normalized and normalized == normalize_answer(expected):
        return True
    if not symbolic or not normalized:
        return False
    from posttrain_jax.rewards.symbolic import symbolic_match

    return symbolic_match(clean_answer(predicted), clean_answer(expected))
