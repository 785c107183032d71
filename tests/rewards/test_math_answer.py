"""Answer extraction and equivalence: a table of cases, including the tricky ones."""

import time
from fractions import Fraction

import pytest

from posttrain_jax.rewards import answers_match, extract_answer, ground_truth_answer, parse_number

# (completion, extract mode, expected extracted answer)
EXTRACTION = [
    (r"So the area is \boxed{12}.", "auto", "12"),
    (r"\boxed{\frac{1}{2}}", "auto", r"\frac{1}{2}"),  # nested braces
    (r"\boxed{\sqrt{\frac{a}{b}}}", "boxed", r"\sqrt{\frac{a}{b}}"),  # two levels of nesting
    (r"first \boxed{1}, corrected: \boxed{2}", "auto", "2"),  # multiple boxed -> last
    (r"thus \boxed 5$.", "auto", "5"),  # \boxed 5 form
    (r"\fbox{7}", "auto", "7"),
    (r"\boxed{  }", "boxed", None),  # empty box
    (r"\boxed{12", "boxed", None),  # cut off inside the box
    (r"\boxedx{3} and 4", "boxed", None),  # not the \boxed command
    ("He has 5 + 3 = 8 apples.\n####  1,234", "auto", "1,234"),  # GSM8K marker, extra spaces
    ("#### 42\nmore text 7", "gsm8k", "42"),
    ("#### Step 1: add\n4 + 5 = 9. The answer is 9.", "auto", "9"),  # a markdown heading is no marker
    ("#### $1,000\n", "gsm8k", "$1,000"),
    ("The answer is 42.", "auto", "42"),
    ("Final Answer: The final answer is $x=5$. I hope it is correct.", "auto", "$x=5$"),  # Minerva format
    ("answer: 3.5.", "answer_is", "3.5"),  # decimal point kept, sentence period dropped
    ("The answer is **42**.", "auto", "**42**"),
    (r"The answer is $\boxed{9}$ for sure", "answer_is", "9"),
    ("12 + 7 = 19", "auto", "19"),  # last number
    ("It costs $1,000.50 in total.", "auto", "1,000.50"),
    ("The temperature is −3 degrees", "auto", "-3"),  # unicode minus
    (r"so $x = \frac{1}{2}$", "last_number", r"\frac{1}{2}"),  # a LaTeX fraction is one number
    (r"about $1.5 \times 10^{-3}$ m", "last_number", r"1.5 \times 10^{-3}"),
    ("3/4 of them", "last_number", "3/4"),
    ("The speed is 1e3 m/s", "last_number", "1e3"),
    ("12-7=5", "last_number", "5"),
    ("no numbers here", "auto", None),  # no answer
    ("", "auto", None),
    ("<think>2+2 is 4, or 5?</think><answer>The answer is 4</answer>", "answer_tag", "4"),
    ("<think>so 4</think>", "answer_tag", None),
    ("  Paris \n", "none", "Paris"),
]


@pytest.mark.parametrize("text,mode,expected", EXTRACTION)
def test_extract_answer(text, mode, expected):
    assert extract_answer(text, mode) == expected


# (predicted answer, ground truth, equal?)
EQUIVALENCE = [
    ("3", "3", True),
    ("3.0", "3", True),
    ("3.", "3", True),  # trailing period
    ("+7", "7", True),
    ("-3", "-3", True),
    ("−3", "-3", True),  # unicode minus
    ("-3", "3", False),
    ("1,000", "1000", True),  # thousands separator
    ("1,234,567.5", "1234567.5", True),
    ("$1,000", "1000", True),
    (r"\$5.00", "5", True),
    ("0.5", r"\frac{1}{2}", True),
    (r"$\frac{1}{2}$", "0.5", True),
    (r"\dfrac{3}{4}", "0.75", True),
    (r"\tfrac{3}{4}", "3/4", True),
    (r"\frac12", "1/2", True),
    (r"-\frac{1}{2}", "-0.5", True),
    (r"\frac{-1}{2}", "-1/2", True),
    (r"\frac{1}{3}", "0.3333333", True),  # within the default rel_tol 1e-6
    (r"\frac{1}{3}", "0.333", False),
    ("1e3", "1000", True),  # scientific notation
    ("1.5e-3", "0.0015", True),
    (r"1.5 \times 10^{-3}", "0.0015", True),
    ("50%", "50", True),  # percent stripped, as MATH's grader does
    ("50%", "0.5", True),  # or read as a fraction
    (r"50\%", "0.5", True),
    ("0.5", "50%", True),
    ("50%", "5", False),
    ("18 dollars", "18", True),  # unit words
    (r"12 \text{ cm}", "12", True),
    ("$x = 5$", "5", True),  # short left-hand side
    ("12 + 7 = 19", "19", True),
    ("**42**", "42", True),
    ("0.1", 0.1, True),  # numeric ground truths
    ("7", 7, True),
    ("7", [6, "7"], True),  # list of acceptable answers
    ("8", [6, "7"], False),
    (r"\text{(B)}", "(B)", True),  # non-numeric: normalised strings
    (r"\left( 1, 2 \right)", "(1,2)", True),
    (r"\sqrt{2}", r"\sqrt {2}", True),
    (r"x^{2}+1", "x^2+1", True),  # the same expression: math-verify (symbolic) decides
    (r"90^\circ", "90", True),
    ("5x", "5", False),  # 5x is an expression, not 5 with a unit
    (None, "3", False),  # no answer found
    ("1/0", "1/0", True),  # not a number; equal as strings
    ("2", "1/0", False),
]


@pytest.mark.parametrize("predicted,ground_truth,equal", EQUIVALENCE)
def test_answers_match(predicted, ground_truth, equal):
    assert answers_match(predicted, ground_truth) is equal


def test_relative_tolerance_is_a_parameter():
    assert not answers_match("3.1416", r"3.14159")
    assert answers_match("3.1416", "3.14159", rel_tol=1e-4)
    assert not answers_match("1000001", "1000000", rel_tol=0)
    # Exact rationals: no float rounding (0.1 + 0.2 style) and no overflow.
    assert answers_match("0.3", "3/10", rel_tol=0)
    assert answers_match("1e400", "1e400", rel_tol=0) and not answers_match("1e400", "2e400")
    with pytest.raises(ValueError, match="rel_tol"):
        answers_match("1", "1", rel_tol=-1)


def test_ground_truth_forms():
    assert ground_truth_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"  # a GSM8K solution
    assert ground_truth_answer(r"The area is $\boxed{\frac{3}{2}}$.") == r"\frac{3}{2}"  # a MATH solution
    assert ground_truth_answer(2.5) == "2.5" and ground_truth_answer(-4) == "-4"
    with pytest.raises(TypeError, match="ground-truth"):
        ground_truth_answer(None)
    with pytest.raises(TypeError, match="ground-truth"):
        ground_truth_answer(True)


def test_parse_number_values():
    assert parse_number("1,000") == (Fraction(1000), False)
    assert parse_number(r"\frac{3}{4}\%") == (Fraction(3, 4), True)
    assert parse_number("1/0") is None and parse_number("abc") is None and parse_number("") is None


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid modes: auto, boxed"):
        extract_answer("1", "boxes")


def test_degenerate_completions_take_linear_time():
    # RL policies produce these; a quadratic extractor would stall the rollout loop.
    texts = ["#### " * 5000 + "a", "The answer is " + "1 a" * 20000, "\\boxed{" * 5000, "1,000" * 10000,
             "The answer is " + "1x" * 20000 + "10^5", ("#### 5 " + "x" * 100 + "\n") * 3000,
             "The answer is " + "$" * 50000]
    start = time.perf_counter()
    for text in texts:
        answers_match(extract_answer(text), "1")
    assert time.perf_counter() - start < 2.0
