"""Checkpoint integrity: manifests, fallback from a truncated or corrupted newest checkpoint, a crafted `.metadata`
that must not run, and non-finite weights refused at load and at save.

Real checkpoints of the built-in tiny MoE in a temporary directory; `leagues convert --checkpoint` is run as a
user runs it (a subprocess), so the crafted-file test covers the command line too.
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leagues.model import load_pretrained, resolve_model_path
from leagues.train import checkpoint
from leagues.train.checkpoint import load_checkpoint, load_latest, save_checkpoint, step_dir
from leagues.train.checkpoint_integrity import MANIFEST, CheckpointError, file_digest, verify
from leagues.train.optim import OptimConfig, build_optimizer, build_scheduler

ROOT = Path(__file__).parents[2]
CFG = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10)


def parts():
    model = load_pretrained(resolve_model_path("tiny-moe"))
    optimizer = build_optimizer(model.parameters(), CFG)
    return model, optimizer, build_scheduler(optimizer, CFG)


@pytest.fixture
def two_checkpoints(tmp_path):
    """Checkpoints of steps 1 and 2 with different weights; returns (root, weights at 1, weights at 2)."""
    model, optimizer, scheduler = parts()
    saved = []
    for step in (1, 2):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, extra={"step": step})
        saved.append(next(model.parameters()).detach().clone())
    return tmp_path, saved[0], saved[1]


def shard(path: Path) -> Path:
    return next(path.glob("*.distcp"))


def resume(root: Path):
    model, optimizer, scheduler = parts()
    found = load_latest(root, lambda p: load_checkpoint(p, model, optimizer, scheduler))
    return found, next(model.parameters()).detach()


def test_manifest_lists_every_file_with_its_checksum(two_checkpoints):
    root, _, _ = two_checkpoints
    path = step_dir(root, 2)
    files = json.loads((path / MANIFEST).read_text())["files"]
    on_disk = {p.name for p in path.iterdir() if p.name not in (MANIFEST, "meta.json")}
    assert set(files) == on_disk and ".metadata" in files and "rank-0.pt" in files
    assert all(files[name] == file_digest(path / name) for name in files)
    assert verify(path) is None


@pytest.mark.parametrize("damage", ["truncate", "garbage", "metadata"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_warning(two_checkpoints, damage):
    root, at_one, _ = two_checkpoints
    newest = step_dir(root, 2)
    if damage == "truncate":
        target = shard(newest)
        os.truncate(target, target.stat().st_size // 2)
    elif damage == "garbage":  # same size, 4 KB of noise in the middle
        with shard(newest).open("r+b") as f:
            f.seek(shard(newest).stat().st_size // 2)
            f.write(os.urandom(4096))
    else:
        (newest / ".metadata").write_bytes(b"\x80\x04not a pickle at all")
    with pytest.warns(UserWarning, match=r"step-00000002 is unusable.*(truncated|corrupted)"):
        (path, extra), weights = resume(root)
    assert path == step_dir(root, 1) and extra == {"step": 1}
    assert torch.equal(weights, at_one)


def test_no_loadable_checkpoint_is_an_error_naming_the_root(two_checkpoints):
    root, _, _ = two_checkpoints
    for step in (1, 2):
        os.truncate(shard(step_dir(root, step)), 10)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="none of the checkpoints"):
        resume(root)


class _Runs:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def craft_metadata(path: Path, marker: Path) -> None:
    """A `.metadata` that runs a command when unpickled, with the manifest rewritten to match it (so only the
    safe reader stands between the file and the command)."""
    (path / ".metadata").write_bytes(pickle.dumps(_Runs(str(marker))))
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][".metadata"] = file_digest(path / ".metadata")
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_crafted_metadata_does_not_execute_on_resume(two_checkpoints, tmp_path):
    root, at_one, _ = two_checkpoints
    marker = tmp_path / "executed"
    craft_metadata(step_dir(root, 2), marker)
    with pytest.warns(UserWarning, match=r"system is not part of a checkpoint's metadata"):
        (path, _), weights = resume(root)
    assert not marker.exists()
    assert path == step_dir(root, 1) and torch.equal(weights, at_one)


def test_crafted_metadata_does_not_execute_in_convert(two_checkpoints, tmp_path):
    root, _, _ = two_checkpoints
    marker = tmp_path / "executed"
    craft_metadata(step_dir(root, 2), marker)
    cmd = [sys.executable, "-m", "leagues.cli", "convert", "--model", "tiny-moe", "--out", str(tmp_path / "hf")]
    result = subprocess.run(
        [*cmd, "--checkpoint", str(step_dir(root, 2))], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "system is not part of a checkpoint's metadata" in result.stderr
    assert not marker.exists()


def test_non_finite_weights_are_refused_at_load_and_never_saved(tmp_path, monkeypatch):
    model, optimizer, scheduler = parts()
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or inf; not saved"):
        save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    assert not list(tmp_path.iterdir())
    # one written anyway (by an older version that did not check), manifest and all: refused at load
    monkeypatch.setattr(checkpoint, "count_non_finite", lambda model, distributed, group=None: 0)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, extra={"step": 1})
    monkeypatch.undo()
    assert verify(path) is None
    fresh, opt, sched = parts()
    with pytest.raises(CheckpointError, match=r"\d+ loaded model weights are NaN or inf"):
        load_checkpoint(path, fresh, opt, sched)


def test_a_non_finite_loss_skips_the_update_is_counted_and_the_checkpoint_stays_finite(tmp_path):
    from leagues.train.trainer import Trainer, TrainerConfig
    from leagues.types import Sample

    trainer = Trainer("tiny-moe", TrainerConfig(optim=OptimConfig(lr=1e-2)))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    poisoned = [
        Sample(prompt_ids=[5, 6, 7], response_ids=[8, 9], advantage=adv, rollout_logprobs=[-1.0, -1.0], group_id=0)
        for adv in (1.0, float("nan"))
    ]
    metrics = trainer.train_step(poisoned)
    assert metrics["skipped"] == 1.0 and metrics["skipped_total"] == 1.0
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]), name
    path = trainer.save(tmp_path)
    assert verify(path) is None
    fresh = Trainer("tiny-moe", TrainerConfig(optim=OptimConfig(lr=1e-2)))
    assert fresh.load(path) == {} and fresh.step == 1
