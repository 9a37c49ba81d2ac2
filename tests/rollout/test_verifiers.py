"""Built-in verifiers against hand-checked cases: math (math-verify equivalence), exact, countdown (safe
evaluation, number reuse, illegal syntax) and format."""

import pytest

from leagues.rollout.rewards import RewardConfig, build_reward_fn
from leagues.rollout.verifiers import (
    countdown_expression,
    countdown_reward,
    exact_reward,
    extract_math_answer,
    last_boxed,
    make_format_reward,
    math_reward,
)


@pytest.mark.parametrize(
    ("response", "label", "reward"),
    [
        ("so \\boxed{1/2}", "0.5", 1.0),
        ("The answer is $\\boxed{\\frac{1}{2}}$.", "0.5", 1.0),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}", 1.0),
        ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
        ("first \\boxed{3}, then \\boxed{4}", 4, 1.0),  # the last box counts
        ("first \\boxed{4}, then \\boxed{3}", 4, 0.0),
        ("I think it is 40 or rather 42", 42, 1.0),  # no box: the last number
        ("I think it is 42 or rather 40", 42, 0.0),
        ("no idea", 42, 0.0),
        ("\\boxed{}", 42, 0.0),
        ("\\boxed{abc}", "abc", 1.0),  # a label math-verify cannot parse: compared as text
    ],
)
def test_math_reward(response, label, reward):
    assert math_reward("q", response, label, {}) == reward


def test_math_answer_extraction():
    assert last_boxed("a \\boxed{x^{2}+\\frac{1}{2}} b") == "x^{2}+\\frac{1}{2}"
    assert last_boxed("\\boxed{1} \\boxed{2") is None  # never closed
    assert extract_math_answer("then 3/4.") == "3/4" and extract_math_answer("-2.5") == "-2.5"
    with pytest.raises(ValueError, match="needs a label"):
        math_reward("q", "\\boxed{1}", None, {})


def test_exact_reward():
    assert exact_reward("q", " 42\n", 42, {}) == 1.0
    assert exact_reward("q", "42.", "42", {}) == 0.0
    assert exact_reward("q", "4 2", "42", {}) == 0.0
    with pytest.raises(ValueError, match="needs a label"):
        exact_reward("q", "42", None, {})


COUNTDOWN = {"numbers": [3, 7, 7, 25], "target": 46}


@pytest.mark.parametrize(
    ("response", "reward"),
    [
        ("25+3*7", 1.0),
        ("(25 + 7*3)", 1.0),  # not every number needs to be used
        ("let me think\n25+7*3\n", 1.0),  # the last non-empty line
        ("<answer>25+3*7</answer> and then 1+1", 1.0),  # the answer tag wins over the last line
        ("25+3*7\nso 46", 0.0),  # the last line is not the expression
        ("25+3+7", 0.0),  # wrong target
        ("25+3*7+3-3", 0.0),  # 3 given once, used three times
        ("25+7+7+7", 0.0),  # 7 given twice, used three times
        ("25+21", 0.0),  # 21 not given
        ("__import__('os').system('true')", 0.0),
        ("25+3*7 if 1 else 0", 0.0),
        ("3/(7-7)", 0.0),  # division by zero
        ("-3+49", 0.0),  # no unary minus
        ("7**2-3", 0.0),  # no power
        ("25.0+21", 0.0),  # integer literals only
        ("", 0.0),
        ("(" * 300 + "3" + ")" * 300, 0.0),  # too long to be an answer
    ],
)
def test_countdown_reward(response, reward):
    assert countdown_reward("q", response, COUNTDOWN, {}) == reward


def test_countdown_exact_division_and_bad_label():
    label = {"numbers": [1, 3, 6], "target": 2}
    assert countdown_reward("q", "1/3*6", label, {}) == 1.0  # exact fractions: no float rounding
    assert countdown_reward("q", "6/(1+3)", label, {}) == 0.0
    assert countdown_expression("x <answer> 1+2 </answer> y <answer>3</answer>") == "3"
    with pytest.raises(ValueError, match="countdown"):
        countdown_reward("q", "1+2", {"target": 3}, {})


def test_format_reward():
    pattern = r"<think>.*</think>\s*<answer>.*</answer>"
    full = make_format_reward(pattern)
    assert full("q", "<think>a\nb</think>\n<answer>1</answer>", None, {}) == 1.0
    assert full("q", "x <think>a</think><answer>1</answer>", None, {}) == 0.0
    assert make_format_reward(pattern, "search")("q", "x <think>a</think><answer>1</answer>", None, {}) == 1.0
    fn = build_reward_fn(RewardConfig(name="format", reward_kwargs={"pattern": r"\d+"}))
    assert fn("q", "123", None, {}) == 1.0 and fn("q", "12a", None, {}) == 0.0
    with pytest.raises(ValueError, match="invalid pattern"):
        build_reward_fn(RewardConfig(name="format", reward_kwargs={"pattern": "("}))
    with pytest.raises(ValueError, match="needs reward_kwargs 'pattern'"):
        build_reward_fn(RewardConfig(name="format"))
    with pytest.raises(ValueError, match="takes no reward_kwargs"):
        build_reward_fn(RewardConfig(name="exact", reward_kwargs={"pattern": "x"}))
