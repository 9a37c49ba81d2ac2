"""`leagues train --resume` over a damaged newest checkpoint: the run warns, continues from the one before, and
finishes every step (a real run of the tiny MoE, through the command line)."""

import json
import os

import pytest

from tests.loop.test_loop import leagues_cli

ARGS = [
    "--task", "arithmetic",
    "--checkpoint.every", "1",
    "--checkpoint.keep_last", "3",
    "--rollout.batch_size", "2",
    "--rollout.n_samples_per_prompt", "2",
    "--rollout.max_response_len", "3",
    "--obs.tensorboard", "false",
    "--obs.console", "false",
]  # fmt: skip


@pytest.mark.slow
def test_resume_skips_a_corrupted_newest_checkpoint_with_a_warning(tmp_path):
    run = tmp_path / "run"
    leagues_cli("train", *ARGS, "--steps", "2", "--run_dir", str(run))
    newest = run / "checkpoints" / "step-00000002"
    shard = next(newest.glob("*.distcp"))
    with shard.open("r+b") as f:  # 4 KB of garbage: same size, other bytes
        f.seek(shard.stat().st_size // 2)
        f.write(os.urandom(4096))
    resumed = leagues_cli("train", *ARGS, "--steps", "3", "--run_dir", str(run), "--checkpoint.resume", "true")
    assert "step-00000002 is unusable" in resumed.stderr and "does not match its checksum" in resumed.stderr
    assert "resume: continuing from" in resumed.stdout and "step-00000001 (step 1)" in resumed.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2, 3]
    assert (run / "checkpoints" / "step-00000003" / "manifest.json").is_file()
