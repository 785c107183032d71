"""Rule-based reward functions, their composition and error reporting, and build_rewards."""

import math
import random

import numpy as np
import pytest

from posttrain_jax.data import synthetic
from posttrain_jax.rewards import (R1_FORMAT, RewardError, Rewards, RewardTerm, build_rewards, exact_match_reward,
                                   format_reward, math_reward)


def _call(fn, completions, rows, prompts=None):
    return fn(completions, prompts=prompts or ["q"] * len(completions), rows=rows)


def test_math_reward_scores_like_tulu3():
    fn = math_reward()
    rows = [{"answer": "72"}, {"answer": 0.5}, {"answer": "3"}, {"answer": ["1/2", "0.5"]}]
    completions = [r"... so \boxed{72}", r"$\frac{1}{2}$", "I do not know", "The answer is 1/2."]
    assert _call(fn, completions, rows) == [10.0, 10.0, 0.0, 10.0]
    assert fn.correct_score == 10.0
    custom = math_reward(correct=1.0, incorrect=-1.0, answer_key="solution", extract="boxed")
    assert _call(custom, [r"\boxed{4}", "4"], [{"solution": "#### 4"}] * 2) == [1.0, -1.0]


def test_math_reward_agrees_with_the_synthetic_task_checker():
    # The GRPO quickstart scores the synthetic arithmetic task with last-number extraction.
    fn = math_reward(correct=1.0, extract="last_number")
    rng = random.Random(0)
    completions, rows, expected = [], [], []
    for p in synthetic.generate_problems(300, seed=5):
        wrong = p.answer + rng.choice([-10, -2, -1, 1, 2, 7])
        for text in (p.response(), p.response(show_work=True), f"The answer is {p.answer}.",
                     f"{p.a} {p.op} {p.b} = {wrong}", str(wrong), f"{p.answer} or maybe {wrong}", "no idea", ""):
            completions.append(text)
            rows.append({"answer": p.answer})
            expected.append(1.0 if synthetic.check_answer(text, p.answer) else 0.0)
    assert _call(fn, completions, rows) == expected
    assert 0.3 < np.mean(expected) < 0.6  # both kinds well represented


def test_math_reward_argument_errors():
    with pytest.raises(ValueError, match="valid modes"):
        math_reward(extract="last")
    with pytest.raises(ValueError, match="must differ"):
        math_reward(correct=0.0)
    with pytest.raises(ValueError, match="finite"):
        math_reward(correct=math.inf)


def test_exact_match_reward():
    fn = exact_match_reward()
    rows = [{"answer": "Paris"}, {"answer": "New York"}, {"answer": ["yes", "y"]}, {"answer": "Paris"}]
    assert _call(fn, ["  paris ", r"\text{New York}.", "Y", "Paris, France"], rows) == [1.0, 1.0, 1.0, 0.0]
    strict = exact_match_reward(case_sensitive=True, extract="answer_tag")
    assert _call(strict, ["<answer>Paris</answer>", "<answer>paris</answer>"], rows[:1] * 2) == [1.0, 0.0]


def test_format_reward():
    fn = format_reward()
    good = "<think>\n2 + 2 = 4\n</think>\n<answer>4</answer>\n"
    completions = [good, "<answer>4</answer>", "<think>x</think><answer>4</answer> trailing", "<think>x</think>"]
    assert _call(fn, completions, [{}] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert fn.correct_score is None  # not a verifiable reward: no accuracy metric
    search = format_reward(pattern=r"<answer>.*?</answer>", mode="search", value=0.5)
    assert _call(search, completions, [{}] * 4) == [0.5, 0.5, 0.5, 0.0]
    assert _call(format_reward(dotall=False), [good], [{}]) == [0.0]  # "." does not cross newlines
    assert R1_FORMAT.startswith("<think>")
    with pytest.raises(ValueError, match="not a valid regex"):
        format_reward(pattern="(<think>")
    with pytest.raises(ValueError, match="valid modes: fullmatch, search, match"):
        format_reward(mode="find")


def test_composition_weights_raw_scores_and_metrics():
    rewards = Rewards([("math", math_reward(), 1.0), ("format", format_reward(), 0.5),
                       RewardTerm("length", lambda c, *, prompts, rows: [-len(x) / 100 for x in c], weight=0.0)])
    completions = ["<think>hm</think><answer>\\boxed{4}</answer>", "<think>hm</think><answer>5</answer>", "4"]
    out = rewards(completions, prompts=["2+2?"] * 3, rows=[{"answer": 4}] * 3)
    np.testing.assert_array_equal(out.scores["math"], [10.0, 0.0, 10.0])
    np.testing.assert_array_equal(out.scores["format"], [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(out.total, [10.5, 0.5, 10.0])  # the zero-weight reward is logged only
    assert rewards.verifiable == {"math": 10.0} and rewards.names == ("math", "format", "length")
    metrics = out.metrics()
    assert metrics["rewards/math/accuracy"] == pytest.approx(2 / 3)
    assert metrics["rewards/format/mean"] == pytest.approx(2 / 3)
    assert metrics["rewards/format/std"] == pytest.approx(np.std([1.0, 1.0, 0.0]))
    assert metrics["rewards/total/mean"] == pytest.approx(7.0)
    assert "rewards/format/accuracy" not in metrics and "rewards/length/mean" in metrics
    # Accuracy of a custom verifiable function: the correct score given in its term.
    custom = Rewards([RewardTerm("hit", lambda c, *, prompts, rows: [1.0, 0.0], correct_score=1.0)])
    assert custom(["a", "b"], prompts=[1, 2], rows=[{}, {}]).metrics()["rewards/hit/accuracy"] == 0.5


def test_a_failing_reward_names_function_sample_prompt_and_completion():
    rewards = Rewards([("format", format_reward(), 1.0), ("math", math_reward(), 1.0)])
    long_completion = "x" * 5000 + " 42"
    with pytest.raises(RewardError) as info:
        rewards(["1", long_completion], prompts=["first?", "second?"], rows=[{"answer": 1}, {"solution": 42}])
    message = str(info.value)
    assert "reward function 'math' failed on sample 1 of 2" in message
    assert "'answer'" in message and "['solution']" in message  # the missing key and the row's keys
    assert "second?" in message and "chars)" in message and len(message) < 1000  # truncated completion
    assert isinstance(info.value.__cause__, KeyError) and info.value.index == 1 and info.value.reward == "math"


def test_a_failing_batch_function_is_located_by_sample():
    def fragile(completions, *, prompts, rows):
        return [1.0 / len(c) for c in completions]  # ZeroDivisionError on an empty completion

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"}]
    with pytest.raises(RewardError, match=r"'fragile' failed on sample 2 of 3: ZeroDivisionError") as info:
        Rewards([("fragile", fragile, 1.0)])(["a", "bb", ""], prompts=[chat] * 3, rows=[{}] * 3)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert "prompt: '[2 messages] ... user: What is 2 plus 2?'" in str(info.value)

    def batch_only(completions, *, prompts, rows):
        if len(completions) > 1:
            raise RuntimeError("needs a batch of one")
        return [0.0]

    with pytest.raises(RewardError, match="no single sample fails alone") as info:
        Rewards([("batch_only", batch_only, 1.0)])(["a", "b"], prompts=["p"] * 2, rows=[{}] * 2)
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("result,match", [
    ([1.0], "returned 1 scores for 2 completions"),
    ([1.0, float("nan")], "sample 1 of 2: score nan is not finite"),
    ([math.inf, 1.0], "sample 0 of 2: score inf is not finite"),
    ([1.0, None], "score None .* is not a number"),
    ([True, 1.0], "is not a number"),
    (3.0, "returned float, not a list of 2 scores"),
])
def test_bad_scores_are_errors(result, match):
    with pytest.raises(RewardError, match=match):
        Rewards([("bad", lambda c, *, prompts, rows: result, 1.0)])(["a", "b"], prompts=["p"] * 2, rows=[{}] * 2)


def test_rewards_argument_errors():
    fn = math_reward()
    with pytest.raises(ValueError, match="repeated: \\['math'\\]"):
        Rewards([("math", fn, 1.0), ("math", fn, 2.0)])
    with pytest.raises(ValueError, match="weight must be a finite number"):
        Rewards([("math", fn, float("nan"))])
    with pytest.raises(TypeError, match="not callable"):
        Rewards([("math", "math", 1.0)])
    with pytest.raises(ValueError, match="at least one"):
        Rewards([])
    with pytest.raises(ValueError, match="2 completions, 1 prompts, 2 rows"):
        Rewards([("math", fn, 1.0)])(["1", "2"], prompts=["p"], rows=[{}, {}])


def test_build_rewards_from_config():
    rewards = build_rewards([{"name": "math", "weight": 1.0, "correct": 1.0, "extract": "last_number"},
                             {"name": "format", "pattern": "<answer>.*?</answer>", "mode": "search", "weight": 0.5},
                             {"name": "math", "label": "math_boxed", "extract": "boxed", "weight": 0.0}])
    assert rewards.weights == {"math": 1.0, "format": 0.5, "math_boxed": 0.0}
    assert rewards.verifiable == {"math": 1.0, "math_boxed": 10.0}
    out = rewards(["<answer>7</answer>", r"\boxed{7}"], prompts=["p"] * 2, rows=[{"answer": 7}] * 2)
    np.testing.assert_array_equal(out.total, [1.5, 1.0])
    import ml_collections
    assert build_rewards([ml_collections.ConfigDict({"name": "exact_match"})]).names == ("exact_match",)


@pytest.mark.parametrize("specs,match", [
    ([{"name": "maths"}], r"rewards\[0\]: unknown reward name 'maths' \(did you mean 'math'\?\); "
                          "valid names: math, exact_match, format, reward_model"),
    ([{"name": "math"}, {"name": "math", "corect": 1.0}],
     r"rewards\[1\] \('math'\): unknown key 'corect' \(did you mean 'correct'\?\); valid keys: answer_key, correct, "
     "extract, incorrect, label, name, rel_tol, weight"),
    ([{"weight": 1.0}], r"rewards\[0\]: missing 'name'"),
    ([{"name": "reward_model", "tokenizer": "t.model"}], r"missing required key\(s\) 'checkpoint'"),
    ([{"name": "format", "mode": "find"}], r"rewards\[0\] \('format'\): unknown format mode"),
    ([{"name": "math"}, {"name": "math"}], "reward names must be unique"),
    ([], "non-empty list"),
    ({"name": "math"}, "non-empty list"),
    (["math"], "a reward spec is a dict"),
])
def test_build_rewards_errors(specs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_rewards(specs)
