"""The RL loop end to end on the tiny model: colocated on 1 and 2 ranks, disaggregated, determinism against a
golden file, resume after a real kill, rewards that raise, and a distilled student that gains most of its
teacher's held-out accuracy.

Every run here is a real job: the built-in tiny MoE, a warm start, the in-process engine, real rewards
(`rewards_for_tests.py`), real files in a temporary run directory; 2-rank runs go through
`leagues train --nproc 2` (torchrun, gloo). The distillation run starts from two trained tiny checkpoints kept in
tests/assets/distill/ instead: making them takes minutes.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from leagues.config import apply_overrides
from leagues.loop import TrainConfig, train
from leagues.model import resolve_model_path

REWARDS = Path(__file__).parent / "rewards_for_tests.py"
GOLDEN = Path(__file__).parents[1] / "assets" / "golden_metrics.jsonl"
ROOT = Path(__file__).parents[2]

# An easy objective for a few steps: warm start on 1-digit sums, then RL towards answers starting with "1".
EASY = [
    "--task", "arithmetic",
    "--task_params", "{max_digits: 1}",
    "--reward.name", f"{REWARDS}:starts_with_one",
    "--warm_start.steps", "30",
    "--warm_start.batch_size", "32",
    "--steps", "6",
    "--rollout.batch_size", "16",
    "--rollout.n_samples_per_prompt", "8",
    "--rollout.max_response_len", "4",
    "--trainer.optim.lr", "3e-3",
    "--obs.tensorboard", "false",
    "--obs.console", "false",
]  # fmt: skip


def config(run_dir: Path, *extra: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), [*EASY, "--run_dir", str(run_dir), *extra])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rl_rows(run_dir: Path) -> list[dict]:
    return [row for row in read_metrics(run_dir) if row["step"] >= 1 and "rollout/reward_mean" in row]


def assert_improves(rows: list[dict]) -> None:
    rewards = [row["rollout/reward_mean"] for row in rows]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.1, rewards


def leagues_cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "leagues.cli", *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_colocated_one_rank_learns_and_writes_everything(tmp_path):
    history = train(config(tmp_path / "run", "--eval.every", "3", "--eval.num_prompts", "32"))
    assert len(history) == 6
    rows = rl_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert_improves(rows)
    for key in ("train/loss", "train/grad_norm", "train/entropy/mean", "train/mismatch/abs_diff_mean", "time/train"):
        assert all(math.isfinite(row[key]) for row in rows), key
    steps_with_eval = [row["step"] for row in read_metrics(tmp_path / "run") if "eval/accuracy" in row]
    assert steps_with_eval == [0, 3, 6]
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "warm_start" / "config.json").is_file()
    assert (run / "checkpoints" / "step-00000006").is_dir()
    assert (run / "report" / "summary.md").is_file() and (run / "report" / "reward.png").is_file()


def test_minibatch_updates_make_the_clip_act_in_a_run(tmp_path):
    """`--trainer.num_minibatches 4`: four updates a step against the old policy fixed before the first, so
    the ratio moves and the PPO clip acts (with one update a step the ratio is 1 and the clip never does)."""
    extra = [
        "--steps",
        "2",
        "--trainer.num_minibatches",
        "4",
        "--trainer.optim.lr",
        "3e-2",
        "--checkpoint.enabled",
        "false",
    ]
    train(config(tmp_path / "run", *extra))
    rows = rl_rows(tmp_path / "run")
    assert len(rows) == 2
    assert max(row["train/policy/clip_frac"] for row in rows) > 0
    assert max(row["train/policy/ratio_max"] for row in rows) > 1.0


def test_ppo_with_a_critic_from_the_command_line(tmp_path):
    """`leagues train --advantage.estimator gae`: the critic values every response token (`time/values`), trains
    alone for `critic.warmup_steps`, then beside the policy; its metrics are logged every step."""
    extra = ["--advantage.estimator", "gae", "--critic.optim.lr", "3e-3", "--critic.warmup_steps", "1"]
    leagues_cli("train", *EASY, "--steps", "3", "--run_dir", str(tmp_path / "run"), "--report", "false", *extra)
    rows = rl_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2, 3]
    for key in ("train/critic/value_loss", "train/critic/explained_variance", "train/critic/value_mean", "time/values"):
        assert all(math.isfinite(row[key]) for row in rows), key
    assert "train/grad_norm" not in rows[0] and all("train/grad_norm" in row for row in rows[1:])  # the warm-up
    assert rows[0]["train/critic/value_mean"] == 0.0 and rows[-1]["train/critic/value_mean"] != 0.0
    assert (tmp_path / "run" / "checkpoints" / "step-00000003").is_dir()


def test_a_ppo_run_resumed_from_a_checkpoint_repeats_the_uninterrupted_one(tmp_path):
    """Policy, critic, both optimizers and schedules, data position and RNG come back from step 2's checkpoint:
    steps 3 and 4 repeat exactly (the critic trains alone through step 3: the policy first moves after the resume)."""
    extra = ["--advantage.estimator", "gae", "--critic.optim.lr", "3e-3", "--critic.warmup_steps", "3"]
    extra += ["--steps", "4", "--checkpoint.every", "2", "--checkpoint.keep_last", "0", "--report", "false"]
    extra += ["--deterministic", "true"]  # the engine batches as requests arrive, which load moves: invariant kernels
    extra += ["--rollout.batch_size", "4"]  # 4 groups of 8: the invariant kernels are slow on CPU
    train(config(tmp_path / "whole", *extra))
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000004")
    train(config(tmp_path / "cut", *extra, "--checkpoint.resume", "true"))
    whole, resumed = rl_rows(tmp_path / "whole"), rl_rows(tmp_path / "cut")
    assert [row["step"] for row in resumed] == [1, 2, 3, 4]
    assert [comparable(r) for r in resumed] == [comparable(r) for r in whole]
    assert "train/grad_norm" in whole[3] and "train/grad_norm" not in whole[2]


@pytest.mark.parametrize("form", ["loss", "reward"])
def test_kl_to_the_reference_as_a_loss_term_or_as_reward_shaping(form, tmp_path):
    """`--trainer.loss.kl_coef` alone: a KL term in the loss; with `--advantage.kl_in_reward`: a penalty on
    each sample's reward instead, and no KL term."""
    extra = ["--steps", "2", "--checkpoint.enabled", "false", "--trainer.loss.kl_coef", "0.1"]
    extra += ["--trainer.optim.lr", "3e-2", "--trainer.loss.kl_estimator", "k3"]
    if form == "reward":
        extra += ["--advantage.kl_in_reward", "true"]
    train(config(tmp_path / "run", *extra))
    rows = rl_rows(tmp_path / "run")
    assert len(rows) == 2
    shaped, term = "train/kl/reward_penalty_mean", "train/kl/mean"
    assert all((shaped in row, term in row) == (form == "reward", form == "loss") for row in rows)
    values = [row[shaped if form == "reward" else term] for row in rows]
    assert values[0] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert abs(values[1]) > 1e-6  # step 2: it has moved (k3 >= 0: a penalty <= 0, a term >= 0)
    with pytest.raises(ValueError, match="advantage.kl_in_reward: needs trainer.loss.kl_coef"):
        config(tmp_path / "bad", "--advantage.kl_in_reward", "true")


@pytest.mark.slow
def test_on_policy_distillation_from_the_command_line_deterministic_and_replaying(tmp_path):
    """`leagues train --distill.teacher ... --advantage.estimator distill`: the teacher (here the base model, unlike
    the warm-started student) scores every step's tokens (`time/teacher`) and `train/distill/reverse_kl` is logged;
    the student stays exactly on-policy in deterministic mode with routing replay (mismatch 0, routes replayed)."""
    extra = ["--distill.teacher", "tiny-moe", "--advantage.estimator", "distill", "--deterministic", "true"]
    extra += ["--trainer.moe.routing_replay", "rollout", "--steps", "2", "--rollout.batch_size", "4"]
    leagues_cli("train", *EASY, *extra, "--run_dir", str(tmp_path / "run"), "--report", "false")
    rows = rl_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["train/distill/reverse_kl"]) and row["train/distill/reverse_kl"] != 0.0
        assert row["time/teacher"] > 0 and row["train/mismatch/abs_diff_max"] == 0.0
        assert row["train/moe/route_mismatch_frac"] == 0.0


@pytest.mark.slow
def test_distillation_closes_most_of_the_gap_to_the_teacher(tmp_path, capsys):
    """The student (the tiny MoE after `make run`'s SFT warm start, about 30% held-out greedy accuracy) distilled
    for 60 steps from the teacher (the same warm start after `make run`'s 500 GRPO steps, about 83%) with
    `--advantage.estimator distill`: no task reward, the teacher's per-token logprobs are the whole signal. On the
    same 1,024 held-out problems the student closes more than half of the gap (30.5% -> 66.2% against 83.3%: 68%;
    63-71% over seeds 0-4, each drawing other problems). Both checkpoints are files in tests/assets/distill/
    (`make_assets.py` there made them)."""
    from leagues.cli.main import main

    assets = Path(__file__).parents[1] / "assets" / "distill"
    # the problems the eval verb measures the teacher on: seed 0's first 1,024, answers of up to 4 tokens
    held_out = ["--task", "arithmetic", "--eval.num_prompts", "1024", "--rollout.max_response_len", "4"]
    assert main(["eval", "--model", str(assets / "teacher"), "--task", "arithmetic", "--num_prompts", "1024",
                 "--max_response_len", "4"]) == 0  # fmt: skip
    teacher = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"]
    # 128 prompts x 4 samples a step; without the warm-up, Adam's first steps at 2e-3 set the student back first
    args = ["--distill.teacher", str(assets / "teacher"), "--advantage.estimator", "distill", "--steps", "60"]
    args += ["--rollout.batch_size", "128", "--rollout.n_samples_per_prompt", "4", "--trainer.optim.lr", "2e-3"]
    args += ["--trainer.optim.warmup_steps", "10", "--trainer.optim.schedule", "cosine"]
    args += ["--trainer.optim.min_lr_ratio", "0.1", "--eval.every", "60", "--checkpoint.enabled", "false"]
    args += ["--obs.tensorboard", "false", "--obs.console", "false", "--report", "false"]
    run_dir = tmp_path / "run"
    assert main(["train", "--model", str(assets / "student"), *held_out, *args, "--run_dir", str(run_dir)]) == 0
    accuracy = {row["step"]: row["eval/accuracy"] for row in read_metrics(run_dir) if "eval/accuracy" in row}
    before, after = accuracy[0], accuracy[60]
    assert teacher - before > 0.4, (teacher, before)  # the assets: a clear gap to close
    closed = (after - before) / (teacher - before)
    assert closed > 0.5, (teacher, before, after)
    kl = [row["train/distill/reverse_kl"] for row in rl_rows(run_dir)]
    assert sum(kl[-10:]) < 0.5 * sum(kl[:10]), kl


def test_a_teacher_with_another_vocabulary_is_refused_before_the_warm_start(tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(resolve_model_path("tiny-moe"), teacher)
    config_json = json.loads((teacher / "tokenizer.json").read_text())
    vocab = config_json["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (teacher / "tokenizer.json").write_text(json.dumps(config_json))
    cfg = config(tmp_path / "run", "--distill.teacher", str(teacher))
    with pytest.raises(ValueError, match="distill.teacher .*: its tokenizer differs from the student's"):
        train(cfg)
    assert not (tmp_path / "run" / "warm_start").exists()


def test_a_bad_reward_is_reported_before_the_warm_start(tmp_path):
    cfg = config(tmp_path / "run", "--reward.name", f"{REWARDS}:no_such_reward")
    with pytest.raises(ValueError, match="no_such_reward"):
        train(cfg)
    assert not (tmp_path / "run" / "warm_start").exists()


def train_two_ranks(tmp_path: Path, *args: str) -> list[dict]:
    """`leagues train --nproc 2` on the easy objective (plus `args`); the RL steps' metrics."""
    leagues_cli("train", "--nproc", "2", *EASY, *args, "--run_dir", str(tmp_path / "run"))
    return rl_rows(tmp_path / "run")


@pytest.mark.slow
def test_colocated_two_gloo_ranks(tmp_path):
    rows = train_two_ranks(tmp_path)
    assert len(rows) == 6
    assert all(row["rollout/num_samples"] == 16 * 8 for row in rows)  # both ranks' groups counted
    assert_improves(rows)


@pytest.mark.slow
def test_colocated_expert_parallel_engines(tmp_path):
    """Two ranks whose engines split the experts: lockstep rollouts and evals, new weights sliced per engine."""
    args = [
        "--engine_ep",
        "true",
        "--trainer.moe.routing_replay",
        "rollout",
        "--eval.every",
        "3",
        "--eval.num_prompts",
        "32",
    ]
    rows = train_two_ranks(tmp_path, *args)
    assert len(rows) == 6
    assert all(row["train/moe/route_mismatch_frac"] == 0.0 for row in rows)
    assert max(row["train/mismatch/abs_diff_max"] for row in rows) < 1e-4  # the engines have the new weights
    assert_improves(rows)


@pytest.mark.slow
def test_a_failed_expert_parallel_engine_step_ends_the_job(tmp_path):
    """Rank 1's engine fails a step while rank 0's waits in the experts' exchange: the job ends with the
    error (it hung before), instead of waiting out the collectives' timeout."""
    script = Path(__file__).parent / "engine_fault_job.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    args = [*EASY, "--warm_start.steps", "0", "--engine_ep", "true", "--checkpoint.enabled", "false"]
    proc = subprocess.run(
        [*cmd, *args, "--run_dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode != 0
    assert "fault in rank 1's engine step" in proc.stderr
    assert "rank 1: the expert-parallel engine failed a step" in proc.stderr


@pytest.mark.slow
def test_deterministic_with_expert_parallel_engines_and_trainer(tmp_path):
    """Experts split over two ranks on both sides: rollout logprobs still equal the trainer's bit for bit.
    (Checkpoints are off: the run writes none.)"""
    args = ["--deterministic", "true", "--engine_ep", "true", "--trainer.parallel.ep", "2", "--steps", "3"]
    rows = train_two_ranks(tmp_path, *args, "--checkpoint.enabled", "false")
    assert len(rows) == 3
    assert all(row["train/mismatch/abs_diff_max"] == 0.0 for row in rows)
    assert not (tmp_path / "run" / "checkpoints").exists()


def comparable(row: dict) -> dict:
    """The metrics that must repeat exactly: everything but timings and throughput."""
    return {k: v for k, v in row.items() if not k.startswith("time") and "per_s" not in k}


def test_determinism_against_golden_file(tmp_path):
    """A short run's per-step metrics equal the committed golden file (regenerate only with a reason:
    LEAGUES_REGENERATE_GOLDEN=1)."""
    train(config(tmp_path / "run", "--steps", "3"))
    rows = [comparable(row) for row in rl_rows(tmp_path / "run")]
    if os.environ.get("LEAGUES_REGENERATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    golden = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    assert len(rows) == len(golden)
    for row, want in zip(rows, golden, strict=True):
        assert row.keys() == want.keys()
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (row["step"], key)


def test_failing_reward_is_contained(tmp_path, capsys):
    history = train(config(tmp_path / "run", "--reward.name", f"{REWARDS}:flaky", "--steps", "2"))
    assert len(history) == 2
    assert sum(row["rollout/failed"] for row in history) > 0  # counted, not fatal
    assert all(math.isfinite(row["train/loss"]) for row in history)
    out = capsys.readouterr().out  # and said, with the reward's own error
    assert "samples failed on rank 0" in out and "this reward is broken for answers starting with 1" in out


@pytest.mark.slow
@pytest.mark.parametrize("weight_sync", ["disk", "distributed"])
def test_external_engine_over_http(tmp_path, weight_sync):
    from tests.serve.test_server import _launch, _wait_url
    from tests.sync.test_distributed import free_port

    server = _launch()
    try:
        url = _wait_url(server)
        sync = [
            "--weight_sync.transport",
            weight_sync,
            "--weight_sync.port",
            str(free_port()),
            "--trainer.moe.routing_replay",
            "rollout",
        ]
        history = train(config(tmp_path / "run", "--steps", "2", "--engine_urls", f"[{url}]", *sync))
        assert len(history) == 2 and all(row["rollout/num_samples"] == 16 * 8 for row in history)
        assert all(row["train/moe/route_mismatch_frac"] == 0.0 for row in history)  # routes came over HTTP
        info = httpx.get(f"{url}/get_server_info", timeout=30).json()
        assert info["weight_version"] == 2  # the engine serves the trainer's weights after step 2
        if weight_sync == "disk":
            assert Path(info["model_path"]).resolve() == (tmp_path / "run" / "weights").resolve()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_users_own_data_and_reward_from_the_command_line(tmp_path, capsys):
    """The documented path: `leagues train --data my.jsonl --reward my_module:my_fn` (shorthands of
    `--data.path` and `--reward.name`), with prompts through the chat template."""
    from leagues.cli.main import main

    data = tmp_path / "my.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "label": str(i)}) + "\n" for i in range(8)))
    args = ["train", "--data", str(data), "--reward", f"{REWARDS}:starts_with_one", "--steps", "2"]
    args += ["--rollout.batch_size", "4", "--rollout.n_samples_per_prompt", "2", "--rollout.max_response_len", "4"]
    args += ["--obs.tensorboard", "false", "--run_dir", str(tmp_path / "run")]
    assert main(args) == 0
    rows = rl_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2] and rows[0]["rollout/num_samples"] == 8
    assert main(["train", "--data", str(tmp_path / "missing.jsonl"), "--reward", "exact"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_eval_verb_reports_accuracy_and_pass_at_n(tmp_path, capsys):
    from leagues.cli.main import main

    args = ["eval", "--task", "arithmetic", "--num_prompts", "8", "--max_response_len", "4"]
    assert main([*args, "--n", "4", "--temperature", "1", "--out", str(tmp_path / "out.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["prompts"] == 8 and 0 <= result["accuracy"] <= result["pass@4"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and {"prompt", "response", "reward"} <= rows[0].keys()


def test_prompt_longer_than_the_context_is_rejected_naming_the_line(tmp_path):
    data = tmp_path / "long.jsonl"
    rows = [{"prompt": "short", "label": "1"}, {"prompt": "x" * 200, "label": "1"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "--data",
        str(data),
        "--reward",
        "exact",
        "--engine.max_model_len",
        "128",
        "--rollout.max_response_len",
        "16",
    ]
    cfg = apply_overrides(TrainConfig(), [*args, "--run_dir", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=r"long.jsonl:2"):
        train(cfg)
    with pytest.raises(ValueError, match="leaves no room"):
        train(apply_overrides(cfg, ["--rollout.max_response_len", "128"]))
    filtered = apply_overrides(cfg, ["--data.filter_long_prompts", "true", "--steps", "1", "--rollout.batch_size", "1"])
    assert len(train(filtered)) == 1


def test_deterministic_run_has_exactly_zero_mismatch(tmp_path):
    """`leagues train --deterministic`: rollout and training logprobs agree bit for bit on every step."""
    history = train(config(tmp_path / "run", "--steps", "2", "--deterministic", "true", "--rollout.batch_size", "4"))
    for row in history:
        assert row["train/mismatch/abs_diff_max"] == 0.0 and row["train/mismatch/abs_diff_mean"] == 0.0


def test_memory_note_says_what_to_change_when_the_trainer_cannot_fit():
    from leagues.loop.run import memory_note
    from leagues.model import resolve_model_path

    tiny_dir = resolve_model_path("tiny-moe")
    cfg = TrainConfig()
    roomy = memory_note(cfg, tiny_dir, world=2, total=80 * 2**30)
    assert roomy.startswith("trainer memory plan: ") and "grad_accumulation" not in roomy
    tight = memory_note(cfg, tiny_dir, world=2, total=100_000)  # the tiny model's shards alone are ~0.5 MB
    assert "more than this GPU's" in tight and "trainer.parallel.grad_accumulation" in tight
