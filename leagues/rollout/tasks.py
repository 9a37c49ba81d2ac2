"""Built-in tasks: problem generators that own their reward, for training and evaluating without a data file.

Where it sits: a task stands in for a data file. `task.make_rows(num, seed, split)` gives rows
`{"prompt", "label", "response"}` (the response a correct reference answer, for an SFT warm start);
`task_dataset(...)` turns them into the same `PromptDataset` a JSONL file gives, and `write_task_data`
writes them as JSONL for `leagues sft --data` / `leagues train --data`. `task.reward` is the `RewardConfig`
that scores answers to them.

    TASKS   arithmetic   "17+25="                  -> "42"          reward exact
            countdown    "use 3 7 25 to make 46:"  -> "25+(3*7)"    reward countdown
            lookup       "table QXBZ: value of c?" -> lookup(c) -> "17"   reward env (multi-turn, a tool)

Decisions:
- The split of a problem is decided by a hash of the task name and the prompt text (the `test_fraction`
  lowest of SHA-256 space goes to "test"), not by the seed: train and test rows are disjoint for EVERY pair
  of seeds, and a test set is stable while the training seed changes. Within a split rows are distinct; a
  problem space too small for `num` distinct rows raises instead of looping forever.
- Rows are drawn from `random.Random` seeded by a string of (task, split, seed): deterministic across
  processes and Python versions (string seeds are hashed with SHA-512, not `hash()`).
- Prompts are short plain text (well under 30 characters with the defaults) with no chat template: the
  tiny test model is character-level, and a short prompt leaves its context for the answer.
- Countdown targets come from a random expression over the drawn numbers (each used once, in a random
  tree with every compound operand parenthesised), so every problem has a solution, which is also the reference
  response. Division is only used where it is exact, and targets are kept in [1, max_target].
"""

import hashlib
import json
import operator
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

from leagues.config import from_dict
from leagues.rollout.data import DataConfig, PromptDataset, prompts_from_rows
from leagues.rollout.rewards import RewardConfig

SPLITS = ("train", "test")
_MAX_MISSES = 20_000  # draws in a row that give nothing new: the split's problem space is exhausted
_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


@dataclass(kw_only=True, slots=True)
class TaskConfig:
    test_fraction: float = 0.1
    """Share of the problem space (by prompt hash) that belongs to the test split."""


class Task:
    """A problem generator and the reward that checks answers; subclasses set the class variables and
    implement `sample_row`."""

    name: ClassVar[str]
    config_cls: ClassVar[type[TaskConfig]]
    reward_name: ClassVar[str]
    env: ClassVar[str] = ""
    """'module:Factory' of the multi-turn environment the task's episodes run in; empty: single turn."""

    def __init__(self, config: TaskConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()
        if not 0 < self.config.test_fraction < 1:
            raise ValueError(f"{self.name}.test_fraction: must be in (0, 1), got {self.config.test_fraction}")
        self.check_config()

    @property
    def reward(self) -> RewardConfig:
        """The reward of this task (a fresh config: callers may change timeouts or strictness)."""
        return RewardConfig(name=self.reward_name)

    def check_config(self) -> None:
        """Raise ValueError for invalid task parameters."""

    def sample_row(self, rng: random.Random) -> dict[str, Any]:
        """One random problem: {"prompt", "label", "response"}."""
        raise NotImplementedError

    def split_of(self, prompt: str) -> str:
        """'test' or 'train', from the prompt's hash alone."""
        digest = hashlib.sha256(f"{self.name}\0{prompt}".encode()).digest()
        return "test" if int.from_bytes(digest[:8], "big") < self.config.test_fraction * 2**64 else "train"

    def make_rows(self, num: int, seed: int, split: str, at_most: bool = False) -> list[dict[str, Any]]:
        """`num` distinct problems of `split`, the same for the same seed (`at_most`: fewer when the split
        has fewer distinct problems, instead of raising)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if num < 0:
            raise ValueError(f"num must be >= 0, got {num}")
        rng = random.Random(f"leagues-task:{self.name}:{split}:{seed}")
        rows, seen, misses = [], set(), 0
        while len(rows) < num:
            row = self.sample_row(rng)
            if row["prompt"] in seen or self.split_of(row["prompt"]) != split:
                misses += 1
                if misses > _MAX_MISSES:
                    if at_most:
                        break
                    raise ValueError(f"{self.name}: only {len(rows)} distinct {split} problems found, {num} asked")
                continue
            misses = 0
            seen.add(row["prompt"])
            rows.append(row)
        return rows


# ---------------------------------------------------------------------------------------------------
# arithmetic


@dataclass(kw_only=True, slots=True)
class ArithmeticConfig(TaskConfig):
    min_digits: int = 1
    """Fewest digits of an operand."""
    max_digits: int = 2
    """Most digits of an operand."""
    operators: str = "+-"
    """Operators to draw from, a subset of '+-*'."""
    allow_negative: bool = False
    """Allow negative results of '-' (otherwise the larger operand comes first)."""


class ArithmeticTask(Task):
    """`a op b=` -> the result, checked by exact match."""

    name = "arithmetic"
    config_cls = ArithmeticConfig
    reward_name = "exact"

    def check_config(self) -> None:
        cfg = self.config
        if not 1 <= cfg.min_digits <= cfg.max_digits:
            raise ValueError(f"arithmetic: need 1 <= min_digits <= max_digits, got {cfg.min_digits}, {cfg.max_digits}")
        if not cfg.operators or set(cfg.operators) - set("+-*"):
            raise ValueError(f"arithmetic.operators: a non-empty subset of '+-*', got {cfg.operators!r}")

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.config.min_digits, self.config.max_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    def sample_row(self, rng: random.Random) -> dict[str, Any]:
        op = rng.choice(self.config.operators)
        a, b = self._operand(rng), self._operand(rng)
        if op == "-" and not self.config.allow_negative and a < b:
            a, b = b, a
        answer = str(_OPERATORS[op](a, b))
        return {"prompt": f"{a}{op}{b}=", "label": answer, "response": answer}


# ---------------------------------------------------------------------------------------------------
# countdown


@dataclass(kw_only=True, slots=True)
class CountdownConfig(TaskConfig):
    num_numbers: int = 3
    """Numbers given per problem."""
    max_number: int = 20
    """Numbers are drawn from 1..max_number."""
    max_target: int = 100
    """Targets lie in 1..max_target."""
    operators: str = "+-*"
    """Operators the generator builds targets with, a subset of '+-*/' (the reward accepts all four)."""


class CountdownTask(Task):
    """Reach the target with + - * / over the given numbers, each at most once."""

    name = "countdown"
    config_cls = CountdownConfig
    reward_name = "countdown"

    def check_config(self) -> None:
        cfg = self.config
        if cfg.num_numbers < 2 or cfg.max_number < 1 or cfg.max_target < 1:
            raise ValueError(f"countdown: need num_numbers >= 2, max_number >= 1, max_target >= 1, got {cfg}")
        if not cfg.operators or set(cfg.operators) - set("+-*/"):
            raise ValueError(f"countdown.operators: a non-empty subset of '+-*/', got {cfg.operators!r}")

    def sample_row(self, rng: random.Random) -> dict[str, Any]:
        cfg = self.config
        for _ in range(_MAX_MISSES):  # a few draws at most with sensible parameters
            numbers = [rng.randint(1, cfg.max_number) for _ in range(cfg.num_numbers)]
            expression = self._expression(rng, rng.sample(numbers, len(numbers)))
            if expression is None or expression[0].denominator != 1 or not 1 <= expression[0] <= cfg.max_target:
                continue
            target = int(expression[0])
            prompt = f"use {' '.join(map(str, numbers))} to make {target}:"
            return {"prompt": prompt, "label": {"numbers": numbers, "target": target}, "response": expression[1]}
        raise ValueError(f"countdown: no target in 1..{cfg.max_target} found with {cfg}")

    def _expression(self, rng: random.Random, numbers: list[int]) -> tuple[Fraction, str] | None:
        """A random expression using every number once, as (exact value, text); None when only an
        inexact division would fit."""
        if len(numbers) == 1:
            return Fraction(numbers[0]), str(numbers[0])
        cut = rng.randint(1, len(numbers) - 1)
        left, right = self._expression(rng, numbers[:cut]), self._expression(rng, numbers[cut:])
        if left is None or right is None:
            return None
        ops = [
            op for op in self.config.operators if op != "/" or (right[0] != 0 and (left[0] / right[0]).denominator == 1)
        ]
        if not ops:
            return None
        op = rng.choice(ops)
        return _OPERATORS[op](left[0], right[0]), f"{_wrap(left[1])}{op}{_wrap(right[1])}"


def _wrap(text: str) -> str:
    return text if text.isdigit() else f"({text})"


# ---------------------------------------------------------------------------------------------------
# lookup (multi-turn, with a tool)


@dataclass(kw_only=True, slots=True)
class LookupConfig(TaskConfig):
    num_keys: int = 4
    """Keys per table (the letters a, b, c, ...)."""
    value_digits: int = 2
    """Digits of a value: a guess is right with probability 10^-value_digits."""
    tools: bool = True
    """Give the model the `lookup` tool; false is the no-tool control (the value cannot be known)."""


class LookupTask(Task):
    """Each episode has its own random key→value table, reachable only through a `lookup(key)` tool; the
    model is asked for one key's value and the reward is 1 for the exact value. Rows carry the table and key
    (`label`) and a demonstration (`messages`: the call, the tool's answer, the value) for the warm start."""

    name = "lookup"
    config_cls = LookupConfig
    reward_name = "env"
    env = "leagues.agent.lookup:LookupEnv"

    def check_config(self) -> None:
        cfg = self.config
        if not 1 <= cfg.num_keys <= 26 or not 1 <= cfg.value_digits <= 6:
            raise ValueError(f"lookup: need 1 <= num_keys <= 26 and 1 <= value_digits <= 6, got {cfg}")

    def sample_row(self, rng: random.Random) -> dict[str, Any]:
        cfg = self.config
        keys = [chr(ord("a") + i) for i in range(cfg.num_keys)]
        table = {k: str(rng.randrange(10**cfg.value_digits)).zfill(cfg.value_digits) for k in keys}
        key = rng.choice(keys)
        # the table's name tells episodes apart; capitals and no digits, so nothing in it looks like a key or value
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))
        prompt = f"table {name}: value of {key}?"
        call = json.dumps({"name": "lookup", "arguments": {"key": key}})
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": f"<tool_call>{call}</tool_call>"},
            {"role": "tool", "content": table[key]},
            {"role": "assistant", "content": table[key]},
        ]
        label = {"table": table, "key": key, "tools": cfg.tools}
        return {"prompt": prompt, "label": label, "response": table[key], "messages": messages}


# ---------------------------------------------------------------------------------------------------
# registry and helpers

TASKS: dict[str, Task] = {task.name: task for task in (ArithmeticTask(), CountdownTask(), LookupTask())}
"""Every built-in task with its default parameters; `make_task` builds one with others."""


def make_task(name: str, params: dict[str, Any] | None = None) -> Task:
    """The task `name` with `params` (keys of its config; unknown keys and bad values raise ValueError)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    cls = type(TASKS[name])
    return cls(from_dict(cls.config_cls, params or {}, where=f"task {name}: "))


def _as_task(task: Task | str) -> Task:
    return make_task(task) if isinstance(task, str) else task


def write_task_data(task: Task | str, path: str | Path, num: int, seed: int, split: str) -> Path:
    """Write `num` rows of `task` as JSONL (`prompt`, `label`, `response`), for the data loader or SFT."""
    rows = _as_task(task).make_rows(num, seed, split)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def task_dataset(
    task: Task | str, tokenizer: Any, num: int, seed: int, split: str, at_most: bool = False
) -> PromptDataset:
    """`num` prompts of `task` as a dataset (plain text prompts, no chat template), labels included."""
    task = _as_task(task)
    rows = task.make_rows(num, seed, split, at_most=at_most)
    where = [f"{task.name}/{split}: row {i}" for i in range(len(rows))]
    cfg = DataConfig(chat_template=False)
    return prompts_from_rows(zip(where, rows, strict=True), cfg, tokenizer, source=f"task {task.name}/{split}")
