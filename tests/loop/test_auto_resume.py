"""`leagues train --auto_resume N`: a job whose process is killed mid-run is restarted from its last checkpoint
and ends with the metrics of an uninterrupted run (real processes, a real SIGKILL)."""

import os

import pytest

from tests.loop.test_loop import REWARDS, comparable, leagues_cli, rl_rows

SMALL = [
    "--task", "arithmetic",
    "--reward.name", f"{REWARDS}:kill_once",
    "--steps", "3",
    "--checkpoint.every", "1",
    "--rollout.batch_size", "2",
    "--rollout.n_samples_per_prompt", "2",
    "--rollout.max_response_len", "3",
    "--trainer.optim.lr", "3e-3",
    "--obs.tensorboard", "false",
    "--obs.console", "false",
]  # fmt: skip


@pytest.mark.slow
def test_killed_job_is_resumed_and_matches_an_uninterrupted_run(tmp_path):
    leagues_cli("train", *SMALL, "--run_dir", str(tmp_path / "whole"))
    # 4 reward calls a step: the 6th is in step 2, after step 1's checkpoint
    env = os.environ | {"LEAGUES_TEST_KILL_AT": "6", "LEAGUES_TEST_COUNTER": str(tmp_path / "calls")}
    result = leagues_cli("train", *SMALL, "--auto_resume", "2", "--run_dir", str(tmp_path / "cut"), env=env)
    assert "auto_resume: the job failed (killed by signal 9)" in result.stderr
    assert "restart 1 of 2" in result.stderr and "restart 2" not in result.stderr
    assert "continuing from" in result.stdout and "step-00000001 (step 1)" in result.stdout
    whole, resumed = rl_rows(tmp_path / "whole"), rl_rows(tmp_path / "cut")
    assert [row["step"] for row in resumed] == [1, 2, 3]
    assert [comparable(r) for r in resumed] == [comparable(r) for r in whole]


def test_bad_input_is_not_retried(tmp_path):
    result = leagues_cli(
        "train", *SMALL, "--auto_resume", "3", "--data.path", "x.jsonl", "--task", "", "--run_dir", str(tmp_path),
        check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "auto_resume" not in result.stderr and "x.jsonl" in result.stderr
