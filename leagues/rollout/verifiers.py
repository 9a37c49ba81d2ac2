"""Built-in verifiers: small pure reward functions `fn(prompt, response, label, metadata) -> float`.

Where it sits: `rewards.py` registers these under their names (`math`, `exact`, `countdown`, `format`) and
runs them for every sample; tasks (`tasks.py`) pick one as their reward. They are plain functions so a user
reward can call them too (e.g. a format bonus on top of `math_reward`).

Decisions:
- A wrong or unparseable answer scores 0.0; only a problem with the inputs (a missing or malformed label)
  raises, so the scorer marks the sample FAILED and the data bug is seen instead of learnt as "wrong".
- `math`: the answer is the content of the LAST `\\boxed{...}` (nested braces followed), else, when there is
  no box, the last number in the response (so short answers like "42" or "1/2" work without LaTeX); the
  label is parsed as is or, failing that, as inline LaTeX. Equivalence is math-verify's. Its signal-based
  timeouts only work on the main thread, and the scorer runs verifiers on worker threads, so they are off
  here; the scorer's own per-sample timeout bounds the call. A label math-verify cannot parse falls back to
  comparing stripped strings.
- `countdown`: the expression is the last `<answer>...</answer>` if there is one, else the last non-empty
  line. It may use + - * / and parentheses over integer literals, each given number AT MOST once (not
  all of them need be used), no unary minus. It is checked on its `ast` (never `eval`) and evaluated with
  exact fractions; division by zero scores 0.0.
- `format`: `re.fullmatch` (default) or `re.search` of `reward_kwargs["pattern"]`, with DOTALL so `.`
  spans lines. The pattern is compiled once when the scorer is built.
"""

import ast
import re
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from typing import Any

_LAST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TOLERANCE = Fraction(1, 10**6)
_MAX_EXPRESSION_CHARS = 500  # a longer "expression" is not a countdown answer; also bounds ast recursion


def _require_label(label: Any, reward: str) -> str:
    if label is None:
        raise ValueError(f"the {reward!r} reward needs a label, got None")
    return str(label)


# ---------------------------------------------------------------------------------------------------
# exact


def exact_reward(prompt: str, response: str, label: Any, metadata: dict) -> float:
    """1.0 when the response, stripped of surrounding whitespace, equals `str(label)` stripped."""
    return float(response.strip() == _require_label(label, "exact").strip())


# ---------------------------------------------------------------------------------------------------
# math


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text`, nested braces followed; None if there is none
    (or it is never closed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i]
    return None


def extract_math_answer(response: str) -> str | None:
    """The last boxed answer, else the last number; None if there is neither."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    numbers = _LAST_NUMBER.findall(response)
    return numbers[-1] if numbers else None


def _parse_math(text: str) -> list:
    from math_verify import parse  # imported on first use: it pulls in sympy, which only `math` needs

    return parse(text, parsing_timeout=None) or parse(f"${text}$", parsing_timeout=None)


def math_reward(prompt: str, response: str, label: Any, metadata: dict) -> float:
    """1.0 when the response's answer is mathematically equivalent to the label (math-verify), else 0.0."""
    gold_text = _require_label(label, "math").strip()
    answer = extract_math_answer(response)
    if answer is None:
        return 0.0
    from math_verify import verify

    gold, parsed = _parse_math(gold_text), _parse_math(answer)
    if not gold:
        return float(answer == gold_text)
    if not parsed:
        return 0.0
    return float(verify(gold, parsed, timeout_seconds=None))


# ---------------------------------------------------------------------------------------------------
# countdown

_BINARY_OPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


class IllegalExpression(ValueError):
    """The expression uses something other than integer literals, + - * / and parentheses."""


def countdown_expression(response: str) -> str:
    """The answer part of a countdown response: the last `<answer>` block, else the last non-empty line."""
    tagged = _ANSWER_TAG.findall(response)
    if tagged:
        return tagged[-1].strip()
    lines = [line.strip() for line in response.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def evaluate_countdown(expression: str) -> tuple[Fraction, list[int]]:
    """The exact value of `expression` and the integer literals it used; raises IllegalExpression for
    anything outside the allowed grammar and ZeroDivisionError for a division by zero."""
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise IllegalExpression(f"longer than {_MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise IllegalExpression(f"not an expression: {e}") from None
    used: list[int] = []
    return _evaluate(tree.body, used), used


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        return _BINARY_OPS[type(node.op)](_evaluate(node.left, used), _evaluate(node.right, used))
    raise IllegalExpression(f"{type(node).__name__} is not allowed")


def countdown_reward(prompt: str, response: str, label: Any, metadata: dict) -> float:
    """1.0 when the response's expression uses only the given numbers (each at most once) and + - * / ( )
    and equals the target (within 1e-6), else 0.0. Label: {"numbers": [ints], "target": int}."""
    if not (isinstance(label, dict) and isinstance(label.get("numbers"), list) and "target" in label):
        raise ValueError(f"the 'countdown' reward needs a label {{'numbers': [...], 'target': n}}, got {label!r}")
    try:
        value, used = evaluate_countdown(countdown_expression(response))
    except (IllegalExpression, ZeroDivisionError):
        return 0.0
    if Counter(used) - Counter(label["numbers"]):  # some number used more often than it was given
        return 0.0
    return float(abs(value - Fraction(label["target"])) <= _TOLERANCE)


# ---------------------------------------------------------------------------------------------------
# format

_MATCH_MODES = {"fullmatch": re.Pattern.fullmatch, "search": re.Pattern.search}


def make_format_reward(pattern: str, match: str = "fullmatch") -> Callable[[str, str, Any, dict], float]:
    """A reward of 1.0 when the response matches `pattern` (`fullmatch` or `search`, DOTALL), else 0.0."""
    if match not in _MATCH_MODES:
        raise ValueError(f"format reward: match must be one of {', '.join(_MATCH_MODES)}, got {match!r}")
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"format reward: invalid pattern {pattern!r}: {e}") from None
    matcher = _MATCH_MODES[match]

    def format_reward(prompt: str, response: str, label: Any, metadata: dict) -> float:
        return float(matcher(compiled, response) is not None)

    return format_reward
