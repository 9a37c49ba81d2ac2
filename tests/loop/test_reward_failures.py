"""Rewards in a real run: bound by parameter name, and a reward that fails on every sample of a step stops the
run with its exception (through `leagues train`, as a user runs it)."""

from leagues.loop import train
from tests.loop.test_loop import REWARDS, leagues_cli, read_metrics

SMALL = [
    "--task", "arithmetic",
    "--steps", "2",
    "--rollout.batch_size", "2",
    "--rollout.n_samples_per_prompt", "2",
    "--rollout.max_response_len", "3",
    "--obs.tensorboard", "false",
    "--obs.console", "false",
]  # fmt: skip


def test_a_reward_taking_response_and_label_trains(tmp_path):
    from leagues.config import apply_overrides
    from leagues.loop import TrainConfig

    cfg = apply_overrides(TrainConfig(), [*SMALL, "--reward.name", f"{REWARDS}:by_name", "--run_dir", str(tmp_path)])
    history = train(cfg)
    assert len(history) == 2 and all(row["rollout/failed"] == 0 for row in history)
    assert [row["step"] for row in read_metrics(tmp_path) if "train/loss" in row] == [1, 2]


def test_a_reward_failing_on_every_sample_stops_the_run_with_its_exception(tmp_path):
    result = leagues_cli(
        "train", *SMALL, "--reward.name", f"{REWARDS}:always_fails", "--run_dir", str(tmp_path), check=False
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "failed on all 4 samples" in result.stderr
    assert "RuntimeError: this reward cannot score" in result.stderr and "rewards_for_tests.py:" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists() or not read_metrics(tmp_path)
