"""leagues.config: building configs from dicts, YAML and dotted overrides, and the errors naming keys."""

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from leagues.config import (
    apply_overrides,
    describe,
    dump_yaml,
    field_docs,
    from_dict,
    load_yaml,
    to_dict,
)


class Algo(enum.StrEnum):
    GRPO = "grpo"
    RLOO = "rloo"


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate."""
    betas: tuple[float, ...] = (0.9, 0.95)
    """Adam betas."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    lr: float = 1e-5
    """Learning rate.

    Second paragraph."""
    steps: int = 10
    compile: bool = False
    """torch.compile the model."""
    algo: Algo = Algo.GRPO
    mode: Literal["colocated", "disaggregated"] = "colocated"
    clip: float | None = None
    stop: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(kw_only=True, slots=True)
class RunConfig:
    name: str
    """Run name."""
    out: Path = Path("runs")
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_train: TrainConfig | None = None


def test_from_dict_builds_nested_and_coerces():
    cfg = from_dict(
        RunConfig,
        {
            "name": "x",
            "out": "/tmp/r",
            "train": {"lr": 3, "algo": "rloo", "stop": ["a"], "weights": {"m": 1}, "optim": {"betas": [0.8, 0.9]}},
        },
    )
    assert cfg.out == Path("/tmp/r")
    assert cfg.train.lr == 3.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.algo is Algo.RLOO
    assert cfg.train.optim.betas == (0.8, 0.9)
    assert cfg.train.weights == {"m": 1.0}
    assert cfg.eval_train is None
    assert from_dict(RunConfig, {"name": "x", "train": {"lr": "1e-6"}}).train.lr == 1e-6  # YAML 1.1 reads a str


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "train": {"lrr": 1}}, "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ({"name": "x", "train": {"lr": "abc"}}, "train.lr: expected float, got 'abc'"),
        ({"name": "x", "train": {"steps": 1.5}}, "train.steps: expected int, got 1.5"),
        ({"name": "x", "train": {"steps": True}}, "train.steps: expected int, got True"),
        ({"name": "x", "train": {"compile": "yes"}}, "train.compile: expected bool, got 'yes'"),
        ({"name": "x", "train": {"mode": "both"}}, "train.mode: expected one of 'colocated' | 'disaggregated'"),
        ({"name": "x", "train": {"algo": "ppo"}}, "train.algo: expected one of 'grpo' | 'rloo', got 'ppo'"),
        ({"name": "x", "train": {"stop": ["a", 3]}}, "train.stop[1]: expected str, got 3"),
        ({"name": "x", "train": {"optim": {"betas": [0.9, "b"]}}}, "train.optim.betas[1]: expected float"),
        ({"name": "x", "eval_train": {"optim": {"lrr": 1}}}, "unknown config key 'eval_train.optim.lrr'"),
        ({"name": "x", "train": 3}, "train: expected a mapping (TrainConfig), got 3"),
        ({}, "missing required config key 'name'"),
    ],
)
def test_from_dict_errors_name_the_dotted_key(data, message):
    with pytest.raises(ValueError) as info:
        from_dict(RunConfig, data, where="run.yaml: ")
    assert str(info.value).startswith("run.yaml: ")
    assert message in str(info.value)


def test_field_docs_and_describe():
    assert field_docs(TrainConfig)["lr"] == "Learning rate.\n\nSecond paragraph."
    assert "steps" not in field_docs(TrainConfig)
    rows = {info.key: info for info in describe(RunConfig)}
    assert rows["train.optim.lr"].doc == "Peak learning rate."
    assert rows["train.clip"].type_name == "float | None"
    assert rows["name"].default == "required"
    assert rows["train.algo"].default == "'grpo'"


def test_yaml_round_trip(tmp_path):
    cfg = from_dict(RunConfig, {"name": "x", "train": {"algo": "rloo", "clip": 0.2, "stop": ["</s>"]}})
    cfg = apply_overrides(cfg, ["--eval_train.steps", "3"])
    path = dump_yaml(cfg, tmp_path / "sub" / "run.yaml")
    assert load_yaml(RunConfig, path) == cfg
    assert to_dict(load_yaml(RunConfig, path)) == to_dict(cfg)
    assert [p.name for p in path.parent.iterdir()] == ["run.yaml"]  # no temp file left behind


def test_yaml_errors_name_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: x\ntrain:\n  steps: 3\n  lr: abc\n")
    with pytest.raises(ValueError, match=r"run\.yaml:4: train\.lr: expected float, got 'abc'"):
        load_yaml(RunConfig, path)
    path.write_text("name: x\ntrain:\n  optim:\n    lrr: 1\n")
    with pytest.raises(ValueError, match=r"run\.yaml:4: unknown config key 'train\.optim\.lrr'"):
        load_yaml(RunConfig, path)
    path.write_text("name: x\ntrain: [1,\n")
    with pytest.raises(ValueError, match=r"run\.yaml:\d+: invalid YAML"):
        load_yaml(RunConfig, path)
    with pytest.raises(ValueError, match="no such config file"):
        load_yaml(RunConfig, tmp_path / "missing.yaml")


def test_overrides_forms():
    cfg = RunConfig(name="x")
    new = apply_overrides(
        cfg,
        ["--train.lr", "1e-6", "--train.steps=3", "--train.compile", "--train.stop", "[a, b]", "--train.clip", "0.5"],
    )
    assert new.train.lr == 1e-6 and new.train.steps == 3 and new.train.compile is True
    assert new.train.stop == ["a", "b"] and new.train.clip == 0.5
    assert cfg.train.steps == 10, "overrides return a new config"
    assert apply_overrides(new, ["--train.clip", "null"]).train.clip is None
    assert apply_overrides(new, ["--no-train.compile"]).train.compile is False
    assert apply_overrides(new, ["--train.compile", "false"]).train.compile is False
    assert apply_overrides(new, ["--train.optim.betas", "[0.1, 0.2]"]).train.optim.betas == (0.1, 0.2)
    assert apply_overrides(new, ["--train.optim.lr", "-1"]).train.optim.lr == -1.0


def test_overrides_strings_and_dashes():
    cfg = RunConfig(name="x")
    assert apply_overrides(cfg, ["--name", "yes"]).name == "yes"  # YAML reads True; the raw text fits a str
    assert apply_overrides(cfg, ["--name=1.10"]).name == "1.10"
    assert apply_overrides(cfg, ["--name", "a b: c"]).name == "a b: c"
    assert apply_overrides(cfg, ["--train.algo", "rloo"]).train.algo is Algo.RLOO
    assert apply_overrides(cfg, ["--eval-train.steps", "2"]).eval_train.steps == 2  # unset optional section


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.lrr", "1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        (["--trian.lr", "1"], "unknown config key 'trian' (did you mean 'train'?)"),
        (["--train.lr", "abc"], "train.lr: expected float, got 'abc'"),
        (["--train.lr"], "--train.lr: missing value"),
        (["--name.x", "1"], "unknown config key 'name.x'"),
        (["train.lr", "1"], "unexpected argument 'train.lr'"),
        (["--train.mode", "both"], "train.mode: expected one of"),
    ],
)
def test_override_errors_name_the_key(args, message):
    with pytest.raises(ValueError) as info:
        apply_overrides(RunConfig(name="x"), args)
    assert message in str(info.value)
