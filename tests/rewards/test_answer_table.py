"""Answer checking end to end (our extraction, then fast paths, then math-verify): a table of
(completion, reference, verdict, reason), and bounded time on adversarial completions."""

import time

import pytest

from posttrain_jax.rewards import answers_match, extract_answer
from posttrain_jax.rewards import symbolic

# (completion, reference, correct?, why)
TABLE = [
    # --- the issue's inputs
    ("The answer is 72, in total, so the farmer earns that much.", "72", True,
     "the sentence after 'answer is' goes on in prose: its leading number is the answer"),
    ("So she earns $9{,}500 in total.", "9500", True, "{,} is a LaTeX thousands separator, not the end of a number"),
    # --- fractions
    (r"\boxed{\frac{1}{2}}", "0.5", True, "a fraction equals its decimal"),
    (r"\boxed{\frac{3}{6}}", r"\frac{1}{2}", True, "unreduced fraction, exact rationals"),
    (r"The answer is $\frac{2}{3}$.", "0.6667", False, "a rounded decimal is not the fraction (rel_tol 1e-6)"),
    (r"\boxed{1/3}", r"\frac{1}{3}", True, "slash fraction"),
    (r"\boxed{\frac12}", "1/2", True, r"\frac12 shorthand"),
    (r"\boxed{-\frac{3}{4}}", "-0.75", True, "negative fraction"),
    (r"\boxed{\frac{a}{b}}", r"\frac{b}{a}", False, "different symbolic fraction"),
    # --- \dfrac / \tfrac
    (r"\boxed{\dfrac{5}{2}}", "2.5", True, r"\dfrac is \frac"),
    (r"\boxed{\tfrac{7}{4}}", r"\frac{7}{4}", True, r"\tfrac is \frac"),
    (r"\boxed{\dfrac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", True, "rationalised denominator (math-verify)"),
    # --- roots
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", True, "simplified root (math-verify)"),
    (r"\boxed{\sqrt{4}}", "2", True, "a root that is an integer (math-verify)"),
    (r"\boxed{\sqrt{2}}", "1.414", False, "a rounded root is not the root"),
    (r"\boxed{3\sqrt{2}}", r"2\sqrt{3}", False, "different roots"),
    (r"\boxed{\sqrt[3]{27}}", "3", True, "cube root"),
    # --- spacing commands
    (r"\boxed{1\,000}", "1000", True, r"\, as a thousands separator"),
    (r"\boxed{x \! + \! 1}", "x+1", True, r"\! negative space"),
    (r"\boxed{5\;\text{cm}}", "5", True, r"\; space before a unit"),
    (r"\boxed{2\ \text{apples}}", "2", True, r"'\ ' space and a unit"),
    # --- thousands separators
    ("#### 1,234", "1234", True, "comma thousands separator"),
    ("It costs $1,000.50 in total.", "1000.5", True, "thousands and decimals"),
    (r"\boxed{12{,}345{,}678}", "12345678", True, "repeated {,}"),
    ("The total is 1,234 and then 5", "1234", False, "the last number is 5"),
    # --- percentages
    (r"\boxed{50\%}", "0.5", True, "a percent equals its fraction"),
    (r"\boxed{50\%}", "50", True, r"MATH's grader strips \%"),
    ("The answer is 25%.", "0.25", True, "plain percent sign"),
    (r"\boxed{40\%}", "0.5", False, "a different percentage"),
    # --- intervals and tuples
    (r"\boxed{(1, 2)}", "(1,2)", True, "tuple/interval spacing"),
    (r"\boxed{[0, 1)}", "[0,1)", True, "half-open interval"),
    (r"\boxed{(-\infty, 2]}", r"(-\infty,2]", True, "interval with infinity"),
    (r"\boxed{(2, 1)}", "(1, 2)", False, "order matters in a tuple"),
    (r"\boxed{[0, 1]}", "[0, 1)", False, "closed vs half-open"),
    (r"\boxed{\{1, 2\}}", r"\{2, 1\}", True, "sets are unordered (math-verify)"),
    (r"\boxed{(-\infty, 2]}", r"x \le 2", True, "an interval equals the inequality (math-verify)"),
    # --- x = 3 forms
    (r"\boxed{x = 3}", "3", True, "a short left-hand side names the answer"),
    (r"so $x = 5$. The answer is $x=5$.", "5", True, "answer is x = 5"),
    (r"\boxed{k=-2}", "-2", True, "named negative value"),
    (r"\boxed{y = 2x + 1}", "2x+1", True, "an equation's right-hand side"),
    (r"\boxed{x = 4}", "3", False, "wrong value"),
    # --- units
    ("The answer is 18 dollars.", "18", True, "unit word after the number"),
    (r"\boxed{10 \text{ cm}}", "10", True, r"\text{} unit"),
    (r"\boxed{90^\circ}", "90", True, "degrees"),
    ("It is 5 cm long.", "50", False, "a unit does not rescale"),
    # --- multiple choice letters
    (r"The answer is \boxed{B}", "B", True, "a letter"),
    (r"\boxed{\text{(B)}}", "B", True, "a parenthesised letter in \\text (math-verify)"),
    (r"\boxed{C}", "B", False, "a different letter"),
    ("Answer: (D)", "D", True, "a letter in parentheses"),
    ("**Answer:** B", "B", True, "markdown bold around the marker"),
    # --- negative numbers
    ("The temperature is −3 degrees", "-3", True, "unicode minus"),
    (r"\boxed{-7}", "-7", True, "negative integer"),
    (r"\boxed{-7}", "7", False, "the sign matters"),
    ("#### -0.5", "-1/2", True, "negative decimal vs fraction"),
    (r"\boxed{-\dfrac{1}{4}}", "-0.25", True, r"negative \dfrac"),
    # --- scientific notation
    (r"\boxed{1.5 \times 10^{-3}}", "0.0015", True, r"\times 10^{k}"),
    ("The speed is 3e8 m/s", "300000000", True, "e-notation"),
    (r"\boxed{2 \cdot 10^{3}}", "2000", True, r"\cdot 10^{k}"),
    (r"\boxed{1.5 \times 10^{3}}", "150", False, "exponent matters"),
    ("#### 1e-3", "0.001", True, "small e-notation"),
    # --- symbolic (math-verify)
    (r"\boxed{x+1}", "1+x", True, "commuted sum"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True, "expanded square"),
    (r"\boxed{\pi}", "3.14159", False, "pi is not its rounding"),
    (r"\boxed{2\pi}", r"2\pi", True, "identical expression"),
    (r"\boxed{\infty}", r"\infty", True, "infinity"),
    # --- no answer / junk
    ("I don't know.", "3", False, "no number, no marker"),
    (r"\boxed{", "3", False, "cut off inside the box, no number"),
    ("The answer is Paris.", "Paris", True, "a word answer, exact after normalisation"),
]


def test_table_is_broad():
    assert len(TABLE) >= 60
    assert sum(verdict for _, _, verdict, _ in TABLE) >= 30 and sum(not v for _, _, v, _ in TABLE) >= 15


@pytest.mark.parametrize("completion,reference,verdict,reason", TABLE, ids=[row[3][:40] for row in TABLE])
def test_answer_table(completion, reference, verdict, reason):
    extracted = extract_answer(completion)
    assert answers_match(extracted, reference) is verdict, f"{reason}: extracted {extracted!r}"


def test_issue_extractions():
    assert extract_answer("The answer is 72, in total, so the farmer earns that much.") == "72"
    assert extract_answer("So she earns $9{,}500 in total.") == "9,500"


# Completions an RL policy can produce that make sympy work hard; each check must stay bounded.
ADVERSARIAL = [
    (r"\boxed{9^{9^{9^{9}}}}", "1"),
    (r"\boxed{" + "(" * 200 + "1" + ")" * 200 + "}", "1"),
    (r"\boxed{" + "+".join(f"x^{{{i}}}" for i in range(150)) + "}", "0"),
    (r"\boxed{\frac{" * 60 + "1" + "}{2}" * 60 + "}", "2"),
    (r"\boxed{10^{10^{10}} - 10^{10^{10}} + 1}", "1"),
    (r"\boxed{" + "x" * 5000 + "}", "x"),
    (r"\boxed{\sum_{k=1}^{10^{9}} k}", "5"),
]


@pytest.mark.parametrize("completion,reference", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_checks_are_time_bounded(completion, reference):
    start = time.perf_counter()
    answers_match(extract_answer(completion), reference)
    elapsed = time.perf_counter() - start
    # math-verify's SIGALRM timeouts: parse gold, parse prediction, compare, each <= TIMEOUT_SECONDS.
    assert elapsed < 3 * symbolic.TIMEOUT_SECONDS + 1.5, f"took {elapsed:.1f}s"


def test_off_main_thread_the_symbolic_check_is_skipped_not_unbounded():
    import threading

    results = []
    thread = threading.Thread(target=lambda: results.append(answers_match(r"2\sqrt{3}", r"\sqrt{12}")))
    thread.start()
    thread.join(timeout=10)
    assert results == [False] and symbolic.SKIPPED_OFF_MAIN_THREAD >= 1
    assert answers_match("3", "3.0")  # the fast paths do not need it
