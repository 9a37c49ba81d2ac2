"""Partial rollout in a whole run (`leagues.loop.train` with `--rollout.partial true`): carried samples go into
each checkpoint, and a resumed run continues them: every sample carried past the checkpoint is trained on after
the resume (its response starting with the part generated before) or still carried, unless its group was
complete and wholly stale (dropped, and counted)."""

import json
from pathlib import Path

from leagues.config import apply_overrides
from leagues.loop import TrainConfig, train
from leagues.train.checkpoint import read_extra

REWARDS = Path(__file__).parent / "rewards_partial.py"
ARGS = [
    "--task", "arithmetic",
    "--reward.name", f"{REWARDS}:record",
    "--checkpoint.every", "1",
    "--rollout.batch_size", "2",
    "--rollout.n_samples_per_prompt", "2",
    "--rollout.max_response_len", "96",
    "--rollout.partial", "true",
    "--rollout.over_sample", "2.0",
    "--obs.tensorboard", "false",
    "--obs.console", "false",
    "--report", "false",
]  # fmt: skip


def carried(run_dir: Path, step: int) -> dict[int, dict]:
    """The samples a checkpoint carries past its step, by seed."""
    extra = read_extra(run_dir / "checkpoints" / f"step-{step:08d}")
    return {row["metadata"]["seed"]: row for row in extra["partial"]["samples"]}


def test_carried_samples_survive_a_resume(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("LEAGUES_TEST_RECORD", str(tmp_path / "before.jsonl"))
    history = train(apply_overrides(TrainConfig(), [*ARGS, "--run_dir", str(run_dir), "--steps", "2"]))
    assert all(row["rollout/num_samples"] == 4 for row in history)  # exactly the batch's groups, every step
    assert history[-1]["rollout/carried"] > 0 and "rollout/carried_age_max" in history[-1]
    saved = carried(run_dir, 2)
    assert any(row["status"] == "aborted" for row in saved.values())

    monkeypatch.setenv("LEAGUES_TEST_RECORD", str(tmp_path / "after.jsonl"))
    resumed = [*ARGS, "--run_dir", str(run_dir), "--steps", "3", "--checkpoint.resume", "true"]
    (after,) = train(apply_overrides(TrainConfig(), resumed))
    trained = {
        row["seed"]: row["response"] for row in map(json.loads, (tmp_path / "after.jsonl").read_text().splitlines())
    }
    still = carried(run_dir, 3)
    dropped = set()
    for seed, row in saved.items():
        if seed in trained:
            assert trained[seed].startswith(row["metadata"]["response_text"])
        elif seed in still:
            assert still[seed]["response_ids"][: len(row["response_ids"])] == row["response_ids"]
        else:  # only a complete group whose every token the new weights make stale (partial_mask_old) goes
            assert row["status"] in ("completed", "truncated"), f"unfinished sample {seed} was lost"
            dropped.add(row["group_id"])
    assert after["rollout/dropped_groups"] == len(dropped)
