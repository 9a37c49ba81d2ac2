"""Built-in tasks: deterministic rows, disjoint train/test splits, reference answers scored 1.0 by the task's
own reward (wrong ones 0.0), short prompts, parameters, and the JSONL round trip through the data loader."""

import re

import pytest

from leagues.model import load_tokenizer, resolve_model_path
from leagues.rollout.data import DataConfig, load_prompts
from leagues.rollout.rewards import score_sync
from leagues.rollout.tasks import TASKS, ArithmeticConfig, ArithmeticTask, make_task, task_dataset, write_task_data
from leagues.types import Sample, SampleStatus


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model_path("tiny-moe"))


def rewards(task, rows, responses):
    samples = [
        Sample(
            prompt_ids=[1],
            status=SampleStatus.COMPLETED,
            metadata={"prompt_text": row["prompt"], "response_text": response, "label": row["label"]},
        )
        for row, response in zip(rows, responses, strict=True)
    ]
    stats = score_sync(samples, task.reward)
    assert stats.failed == 0
    return [s.reward for s in samples]


def wrong_answer(task_name, row):
    if task_name == "arithmetic":
        return str(int(row["label"]) + 1)
    return f"({row['response']})*2"  # targets are >= 1, so doubling always misses


@pytest.mark.parametrize("name", list(TASKS))
def test_rows_are_deterministic_and_splits_disjoint(name):
    task = TASKS[name]
    assert task.make_rows(50, seed=0, split="train") == task.make_rows(50, seed=0, split="train")
    assert task.make_rows(50, seed=0, split="train") != task.make_rows(50, seed=1, split="train")
    train = {r["prompt"] for seed in (0, 1) for r in task.make_rows(300, seed=seed, split="train")}
    test = [r["prompt"] for seed in (0, 1) for r in task.make_rows(100, seed=seed, split="test")]
    assert len(set(test[:100])) == 100  # distinct within a split
    assert not train & set(test)  # disjoint across splits, whatever the seeds
    assert all(task.split_of(p) == "test" for p in test) and all(task.split_of(p) == "train" for p in train)
    with pytest.raises(ValueError, match="split"):
        task.make_rows(1, seed=0, split="valid")


@pytest.mark.parametrize("name", [name for name, task in TASKS.items() if not task.env])  # env tasks: tests/agent
def test_reference_answers_score_one_and_wrong_answers_zero(name):
    task = TASKS[name]
    rows = task.make_rows(200, seed=3, split="train")
    assert rewards(task, rows, [r["response"] for r in rows]) == [1.0] * len(rows)
    assert rewards(task, rows, [wrong_answer(name, r) for r in rows]) == [0.0] * len(rows)
    assert max(len(r["prompt"]) for r in rows) < 30


def test_task_rows_look_right():
    row = TASKS["arithmetic"].make_rows(1, seed=0, split="train")[0]
    assert re.fullmatch(r"\d{1,2}[+-]\d{1,2}=", row["prompt"]) and row["label"] == row["response"]
    row = TASKS["countdown"].make_rows(1, seed=0, split="train")[0]
    numbers, target = row["label"]["numbers"], row["label"]["target"]
    assert row["prompt"] == f"use {' '.join(map(str, numbers))} to make {target}:"
    assert len(numbers) == 3 and all(1 <= n <= 20 for n in numbers) and 1 <= target <= 100


def test_task_parameters():
    task = make_task("arithmetic", {"min_digits": 3, "max_digits": 3, "operators": "*"})
    rows = task.make_rows(20, seed=0, split="train")
    assert all("*" in r["prompt"] and len(r["prompt"]) == 8 for r in rows)
    countdown = make_task("countdown", {"num_numbers": 4, "operators": "+-*/"})
    rows = countdown.make_rows(50, seed=0, split="train")
    assert all(len(r["label"]["numbers"]) == 4 for r in rows)
    assert rewards(countdown, rows, [r["response"] for r in rows]) == [1.0] * 50
    for name, params, message in [
        ("arithmetic", {"operators": "^"}, "operators"),
        ("arithmetic", {"max_digit": 2}, "did you mean"),
        ("countdown", {"test_fraction": 1.0}, "test_fraction"),
        ("sudoku", {}, "unknown task"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_task(name, params)
    tiny_space = ArithmeticTask(ArithmeticConfig(max_digits=1, operators="+"))  # 100 problems
    with pytest.raises(ValueError, match="distinct train problems"):
        tiny_space.make_rows(200, seed=0, split="train")


@pytest.mark.parametrize("name", list(TASKS))
def test_written_task_data_loads_like_the_task_dataset(tmp_path, tok, name):
    path = write_task_data(name, tmp_path / "data" / f"{name}.jsonl", num=20, seed=0, split="test")
    loaded = load_prompts(DataConfig(path=str(path), chat_template=False, metadata_keys=["response"]), tok)
    direct = task_dataset(name, tok, num=20, seed=0, split="test")
    assert [(p.text, p.prompt_ids, p.label) for p in loaded] == [(p.text, p.prompt_ids, p.label) for p in direct]
    rows = TASKS[name].make_rows(20, seed=0, split="test")
    assert [p.metadata["response"] for p in loaded] == [r["response"] for r in rows]
    assert [p.text for p in direct] == [r["prompt"] for r in rows]
