"""The RL run's config: `resolve(cfg)` (pure, idempotent, refusing contradictions), one owner per knob, every
leaf read by the component it configures, and `config.yaml` loading back to the same run."""

import dataclasses
import json
import sys
import types
import typing
from contextlib import contextmanager
from pathlib import Path

import pytest

from leagues.config import apply_overrides, dump_yaml, load_yaml, to_dict
from leagues.loop import TrainConfig, resolve, train
from leagues.serve.fleet import FleetConfig

REWARDS = Path(__file__).parent / "rewards_for_tests.py"


def test_resolve_is_pure_fills_in_what_other_knobs_decide_and_round_trips(tmp_path):
    args = ["--deterministic", "true", "--rollout.max_response_len", "64", "--trainer.num_minibatches", "4"]
    cfg = apply_overrides(TrainConfig(), [*args, "--trainer.moe.routing_replay", "rollout", "--steps", "7"])
    before = to_dict(cfg)
    out = resolve(cfg)
    assert to_dict(cfg) == before  # the given config is left as it was
    assert out.engine.deterministic and out.rollout.return_routes
    assert out.trainer.loss.max_response_tokens == 64
    assert out.trainer.optim.total_steps == 7 * 4  # the schedule counts optimizer updates
    assert to_dict(resolve(out)) == to_dict(out)  # resolving twice changes nothing
    dump_yaml(out, tmp_path / "config.yaml")
    assert to_dict(resolve(load_yaml(TrainConfig, tmp_path / "config.yaml"))) == to_dict(out)
    given = apply_overrides(
        TrainConfig(), ["--trainer.optim.total_steps", "50", "--trainer.loss.max_response_tokens", "9"]
    )
    assert (resolve(given).trainer.optim.total_steps, resolve(given).trainer.loss.max_response_tokens) == (50, 9)


def test_resolve_gives_the_critic_its_schedule_and_the_policy_the_steps_after_the_critic_warm_up():
    args = ["--advantage.estimator", "gae", "--critic.warmup_steps", "3", "--steps", "10", "--trainer.epochs", "2"]
    out = resolve(apply_overrides(TrainConfig(), args))
    assert (out.trainer.optim.total_steps, out.critic.optim.total_steps) == ((10 - 3) * 2, 10 * 2)
    assert to_dict(resolve(out)) == to_dict(out)
    assert resolve(TrainConfig()).critic.optim.total_steps == 0  # no critic, nothing to derive


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--engine.deterministic", "true"],
            "engine.deterministic: deterministic mode of an RL run is --deterministic",
        ),
        (["--trainer.optim.schedule", "cosine", "--trainer.optim.warmup_steps", "20"], "optim.total_steps"),
    ],
)
def test_resolve_refuses_contradictions(args, message):
    with pytest.raises(ValueError, match=message):
        resolve(apply_overrides(TrainConfig(), args))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--advantage.kl_in_reward", "true"], "advantage.kl_in_reward: needs trainer.loss.kl_coef"),
        (["--checkpoint.every", "-1"], "checkpoint.every: must be >= 0"),
        (["--placement", "both"], "placement: expected one of 'colocated' | 'disaggregated'"),
        (["--weight_sync.transport", "nccl"], "weight_sync.transport: expected one of"),
        (["--engine_offload_weights", "true", "--engine_sleep", "false"], "engine_offload_weights"),
        (["--critic.warmup_steps", "2"], "critic: set, but advantage.estimator grpo trains no critic"),
        (["--advantage.estimator", "gae", "--critic.warmup_steps", "-1"], "critic.warmup_steps: must be >= 0"),
        (["--advantage.estimator", "gae", "--advantage.gamma", "1.5"], r"advantage.gamma: must be in \[0, 1\]"),
        (["--advantage.name", "gae"], "unknown config key 'advantage.name'"),
        (["--distill.coef", "0.5"], "distill: set, but distill.teacher is empty"),
        (["--advantage.estimator", "distill"], "advantage.estimator distill: needs distill.teacher"),
        (["--distill.teacher", "tiny-moe", "--distill.coef", "-1"], "distill.coef: must be >= 0"),
    ],
)
def test_bad_combinations_are_refused_naming_the_key(args, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(TrainConfig(), args)


def test_overrides_are_checked_together_so_their_order_does_not_matter():
    """A check that relates two fields (cosine needs total_steps > warmup) sees both overrides, in any order."""
    for args in (
        ["--trainer.optim.schedule", "cosine", "--trainer.optim.total_steps", "50"],
        ["--trainer.optim.total_steps", "50", "--trainer.optim.schedule", "cosine"],
    ):
        cfg = apply_overrides(TrainConfig(), args)
        assert (cfg.trainer.optim.schedule, cfg.trainer.optim.total_steps) == ("cosine", 50)
    cosine = ["--trainer.optim.schedule", "cosine", "--trainer.optim.warmup_steps", "5"]
    with pytest.raises(ValueError, match="total_steps"):
        apply_overrides(TrainConfig(), [*cosine, "--trainer.optim.total_steps", "1"])


@pytest.mark.parametrize(
    "duplicate", ["--trainer.temperature", "--trainer.keep_last", "--trainer.deterministic", "--moe.routing_replay"]
)
def test_a_knob_has_one_place(duplicate):
    """The rollout owns the temperature, the checkpoint settings `keep_last`, the top-level flag deterministic mode
    and the trainer MoE routing replay: the copies that used to be overwritten are gone."""
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(TrainConfig(), [duplicate, "1"])


# ---------------------------------------------------------------------------------------------------
# every leaf is read


def config_classes(cls: type, seen: dict[type, None] | None = None) -> dict[type, None]:
    """The config dataclasses of the tree under `cls` (in order, each once)."""
    seen = {} if seen is None else seen
    seen[cls] = None
    for tp in typing.get_type_hints(cls).values():
        arms = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        for arm in arms:
            if dataclasses.is_dataclass(arm) and arm not in seen:
                config_classes(arm, seen)
    return seen


def leaves(cls: type, prefix: str = "") -> dict[str, tuple[type, str]]:
    """Dotted key -> (class, field) of every leaf knob (a sub-config is not a leaf; `X | None` is)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out[prefix + f.name] = (cls, f.name)
    return out


# Reads that check or copy a config do not count: only a component using the value does.
NOT_USES = {"__post_init__", "_check_partial", "resolve"}
MACHINERY = ("leagues/config.py", "dataclasses.py", "copy.py", "copyreg.py", "<string>")


@contextmanager
def recording_reads(classes):
    """Every (class, field) read by leagues code, outside config checks and config machinery, while inside."""
    reads: set[tuple[type, str]] = set()

    def getattribute(self, name):
        code = sys._getframe(1).f_code
        if code.co_name not in NOT_USES and not code.co_filename.endswith(MACHINERY):
            reads.add((type(self), name))
        return object.__getattribute__(self, name)

    for cls in classes:
        cls.__getattribute__ = getattribute
    try:
        yield reads
    finally:
        for cls in classes:
            del cls.__getattribute__


# Leaves a one-process colocated CPU run cannot reach, each with where it is read (and tested) instead.
READ_ELSEWHERE = {
    "nproc": "cli/train.py: the launcher (tests/cli: --nproc 2)",
    "nnodes": "cli/launch.py: the launcher (tests/cli: two nodes over loopback)",
    "node_rank": "cli/launch.py: the launcher (tests/cli: two nodes over loopback)",
    "rdzv_endpoint": "cli/launch.py: the launcher (tests/cli: two nodes over loopback)",
    "auto_resume": "cli/train.py: the supervisor (tests/loop: auto resume)",
    "agent.max_turns": "agent/multi_turn.py with an env (tests/agent: env run)",
    "agent.max_tokens": "agent/multi_turn.py with an env (tests/agent: env run)",
    "agent.tool_timeout_s": "agent/multi_turn.py with an env (tests/agent: multi turn)",
    "agent.max_parallel_tools": "agent/multi_turn.py with an env (tests/agent: multi turn)",
    "agent.parser": "agent/multi_turn.py with an env (tests/agent: env run)",
    "num_engine_ranks": "loop/disaggregated.py (tests/loop: disaggregated)",
    "max_staleness": "loop/disaggregated.py (tests/loop: disaggregated)",
    "weight_sync.transport": "loop/run.py with engine_urls (tests/loop: external engine)",
    "weight_sync.address": "loop/run.py, distributed transport (tests/loop: external engine)",
    "weight_sync.port": "loop/run.py, distributed transport (tests/loop: external engine)",
    "engine_sleep": "loop/run.py memory plan, GPUs only",
    "engine_offload_weights": "loop/train.py, with a sleeping engine on GPUs",
    "data.path": "the run trains on a task here (tests/loop: users_own_data)",
    "data.format": "rollout/data.py for data files",
    "data.skip_bad_rows": "rollout/data.py for data files",
    "data.filter_long_prompts": "rollout/data.py for data files",
    "eval.data": "loop/run.py for data files",
    "warm_start.response_key": "loop/warm_start.py for data files",
    "obs.prometheus_addr": "obs/sinks.py with a prometheus_port",
    "engine.kv_cache_fraction": "engine on GPUs",
    "trainer.parallel.activation_checkpointing": "parallel/fsdp.py, with a process group (tests/parallel)",
    "trainer.parallel.reshard_after_forward": "parallel/fsdp.py, with a process group (tests/parallel)",
    "trainer.parallel.reduce_dtype": "parallel/fsdp.py, with a process group (tests/parallel)",
    "trainer.parallel.param_dtype": "parallel/fsdp.py, with a process group (tests/parallel)",
    "trainer.parallel.grad_reduce": "parallel/fsdp.py, with a process group (tests/parallel)",
    "trainer.parallel.grad_accumulation": "parallel/fsdp.py, with a process group (tests/parallel)",
    "trainer.parallel.cpu_offload": "parallel/fsdp.py, with a process group (tests/parallel)",
    "trainer.parallel.sharded_load": "train/trainer.py, with a process group (tests/train: distributed)",
    "trainer.parallel.ep": "parallel/, with a process group (tests/train: distributed)",
    "trainer.loss.mis_lower": "train/losses.py, off_policy token_mis / seq_mis (tests/train: losses)",
    "trainer.loss.mis_upper": "train/losses.py, off_policy token_mis / seq_mis (tests/train: losses)",
    "rollout.over_sample": "rollout/partial.py, with rollout.partial (tests/loop: partial)",
    "rollout.partial_mask_old": "rollout/partial.py, with rollout.partial (tests/loop: partial)",
    "trainer.compile_pad_multiple": "train/trainer.py when compiled, on CUDA (tests/train: trainer gpu)",
} | {
    f"fleet.{f.name}": "serve/fleet.py with engine_urls (tests/loop: engine fleet)"
    for f in dataclasses.fields(FleetConfig)
}


def test_every_leaf_of_the_resolved_config_is_read_and_config_yaml_reruns_the_same_run(tmp_path):
    """A real run records which config fields its components read: every leaf is read, except the few a
    one-process CPU run cannot reach, listed with where they are read (a new ignored field fails here). Then
    the run's `config.yaml`, loaded back, runs again to the same metrics. The run is PPO with a critic (gae):
    it reads every advantage field the other estimators read, and the critic's and GAE's besides; a distillation
    teacher adds its per-token term to GAE's advantages."""
    args = [
        "--task", "arithmetic", "--task_params", "{max_digits: 1}", "--reward.name", f"{REWARDS}:starts_with_one",
        "--warm_start.steps", "2", "--steps", "2", "--rollout.batch_size", "4", "--rollout.n_samples_per_prompt", "4",
        "--rollout.max_response_len", "4", "--eval.every", "1", "--eval.num_prompts", "8", "--checkpoint.every", "1",
        "--obs.tensorboard", "false", "--report", "false", "--run_dir", str(tmp_path / "first"),
        # knobs read only when another knob turns their feature on
        "--trainer.optim.schedule", "cosine", "--trainer.loss.kl_coef", "0.01", "--trainer.loss.off_policy",
        "token_tis", "--rollout.overlong", "penalty", "--rollout.overlong_buffer", "2",
        "--advantage.estimator", "gae", "--critic.warmup_steps", "1", "--critic.optim.schedule", "cosine",
        "--distill.teacher", "tiny-moe", "--distill.coef", "0.5",
    ]  # fmt: skip
    cfg = apply_overrides(TrainConfig(), args)
    classes = list(config_classes(TrainConfig))
    with recording_reads(classes) as reads:
        train(cfg)
    unread = {key for key, where in leaves(TrainConfig).items() if where not in reads}
    assert sorted(unread - READ_ELSEWHERE.keys()) == [], "config fields no component read"
    assert sorted(READ_ELSEWHERE.keys() - unread) == [], "read after all: take them off READ_ELSEWHERE"

    again = load_yaml(TrainConfig, tmp_path / "first" / "config.yaml")
    train(dataclasses.replace(again, run_dir=str(tmp_path / "again")))

    def rows(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [
            {k: v for k, v in json.loads(x).items() if not k.startswith("time") and "per_s" not in k} for x in lines
        ]

    assert rows("again") == rows("first")
