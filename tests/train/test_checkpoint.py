"""Training checkpoints: bitwise resume, killed saves, pruning, FSDP2 on 2 gloo ranks, HF export."""

import os
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from leagues.model import Transformer, config_from_hf, load_pretrained, resolve_model_path
from leagues.model.tiny import TINY_MOE_CONFIG
from leagues.train import checkpoint as ckpt
from leagues.train.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint, step_dir
from leagues.train.optim import SKIPPED_KEY, OptimConfig, build_optimizer, build_scheduler, optimizer_step
from tests import processes

CFG = OptimConfig(lr=1e-2, warmup_steps=2, schedule="cosine", total_steps=6, min_lr_ratio=0.1)


def tiny_model() -> Transformer:
    return load_pretrained(resolve_model_path("tiny-moe"))


@pytest.fixture(autouse=True, scope="module")
def _tiny_moe_exists():
    """Make the built-in model before any test seeds: its first creation draws from the global RNG."""
    resolve_model_path("tiny-moe")


def train_objects(model: Transformer):
    optimizer = build_optimizer(model.parameters(), CFG)
    return optimizer, build_scheduler(optimizer, CFG)


def train_steps(model, optimizer, scheduler, num_steps: int) -> None:
    """Next-token cross-entropy on random ids drawn from the global RNGs (so resuming them matters)."""
    vocab = model.config.vocab_size
    for _ in range(num_steps):
        seq_len = random.choice([7, 9])
        ids_BT = torch.randint(0, vocab, (2, seq_len))
        logits_BTV = model(ids_BT[:, :-1])
        loss = F.cross_entropy(logits_BTV.flatten(0, 1), ids_BT[:, 1:].flatten())
        loss.backward()
        optimizer_step(model.parameters(), optimizer, scheduler, CFG)
        optimizer.zero_grad(set_to_none=True)


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def params_of(model) -> dict[str, torch.Tensor]:
    return {name: full(p.detach()).clone() for name, p in model.named_parameters()}


def optim_state_of(model, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {key: full(value).clone() for key, value in optimizer.state[p].items()}
        for name, p in model.named_parameters()
    }


def assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_bitwise(a[key], b[key])
        else:
            assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- single process


def test_resume_is_bitwise_identical(tmp_path):
    seed_all(0)
    model = tiny_model()
    optimizer, scheduler = train_objects(model)
    train_steps(model, optimizer, scheduler, 4)

    seed_all(0)
    first = tiny_model()
    first_opt, first_sched = train_objects(first)
    train_steps(first, first_opt, first_sched, 2)
    path = save_checkpoint(tmp_path, 2, first, first_opt, first_sched, extra={"data_position": 2, "epoch": (0, "a")})
    del first, first_opt, first_sched

    seed_all(123)  # different streams: only the restored RNG states can reproduce the straight run
    resumed = tiny_model()
    opt, sched = train_objects(resumed)
    assert latest_checkpoint(tmp_path) == path
    assert load_checkpoint(path, resumed, opt, sched) == {"data_position": 2, "epoch": (0, "a")}
    assert sched.last_epoch == 2
    train_steps(resumed, opt, sched, 2)

    assert_bitwise(params_of(resumed), params_of(model))
    assert_bitwise(optim_state_of(resumed, opt), optim_state_of(model, optimizer))
    assert opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert sched.state_dict() == scheduler.state_dict()


def test_killed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    seed_all(0)
    model = tiny_model()
    optimizer, scheduler = train_objects(model)
    train_steps(model, optimizer, scheduler, 1)
    good = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    saved = params_of(model)
    train_steps(model, optimizer, scheduler, 1)

    def killed(*args):
        raise KeyboardInterrupt("killed before the commit")

    monkeypatch.setattr(ckpt, "_commit", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, optimizer, scheduler)
    monkeypatch.undo()
    assert (tmp_path / "step-00000002.tmp" / ".metadata").is_file()  # all data written, never committed
    (tmp_path / "step-00000007.tmp").mkdir()  # killed early: a stray partial shard
    (tmp_path / "step-00000007.tmp" / "__0_0.distcp").write_bytes(b"\0" * 10)
    (tmp_path / "step-00000009").mkdir()  # final name but incomplete (half-deleted or half-copied)
    (tmp_path / "step-00000009" / "rank-0.pt").write_bytes(b"junk")

    assert latest_checkpoint(tmp_path) == good
    fresh = tiny_model()
    fresh_opt, fresh_sched = train_objects(fresh)
    load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_opt, fresh_sched)
    assert_bitwise(params_of(fresh), saved)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step-00000009", fresh, fresh_opt, fresh_sched)

    again = save_checkpoint(tmp_path, 2, model, optimizer, scheduler)  # the retry clears the leftover
    assert latest_checkpoint(tmp_path) == again
    assert not (tmp_path / "step-00000002.tmp").exists()


def test_keep_last_prunes_oldest(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model.parameters(), OptimConfig())
    (tmp_path / "step-00000000.tmp").mkdir()  # an old killed save is cleared too
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, optimizer, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]
    with torch.no_grad():
        model.weight.fill_(3.0)
    save_checkpoint(tmp_path, 5, model, optimizer, keep_last=2)  # saving a step again replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]
    fresh = torch.nn.Linear(3, 2)
    load_checkpoint(latest_checkpoint(tmp_path), fresh, build_optimizer(fresh.parameters(), OptimConfig()))
    assert torch.equal(fresh.weight, torch.full((2, 3), 3.0))
    for step in range(6, 8):
        save_checkpoint(tmp_path, step, model, optimizer, keep_last=0)
    assert len(list(tmp_path.iterdir())) == 4


def test_extra_must_be_plain_data(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model.parameters(), OptimConfig())
    with pytest.raises(ValueError, match=r"extra\['pos'\]"):
        save_checkpoint(tmp_path, 1, model, optimizer, extra={"pos": object()})
    assert latest_checkpoint(tmp_path) is None


def test_skip_counter_is_checkpointed(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model.parameters(), OptimConfig())
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    optimizer_step(model.parameters(), optimizer, None, OptimConfig())
    path = save_checkpoint(tmp_path, 1, model, optimizer)
    fresh = build_optimizer(model.parameters(), OptimConfig())
    load_checkpoint(path, model, fresh)
    assert fresh.param_groups[0][SKIPPED_KEY] == 1


def test_export_hf_round_trips(tmp_path):
    seed_all(0)
    model = tiny_model()
    optimizer, scheduler = train_objects(model)
    train_steps(model, optimizer, scheduler, 1)
    path = save_checkpoint(tmp_path / "ckpt", 1, model, optimizer, scheduler)
    out = export_hf(path, tiny_model(), tmp_path / "hf")
    assert_bitwise(params_of(load_pretrained(out)), params_of(model))


# ---------------------------------------------------------------- FSDP2 on 2 gloo ranks


def sharded_model(mesh, seed: int) -> Transformer:
    from torch.distributed.fsdp import fully_shard

    model = Transformer(config_from_hf(TINY_MOE_CONFIG))
    model.init_weights(seed=seed)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_worker(rank: int, world_size: int, tmp: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)  # two ranks share the CI machine's cores
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        seed_all(rank)  # each rank its own data
        model = sharded_model(mesh, seed=0)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        optimizer, scheduler = train_objects(model)
        train_steps(model, optimizer, scheduler, 2)
        path = save_checkpoint(Path(tmp) / "ckpt", 2, model, optimizer, scheduler, extra={"rank": rank})
        rng = torch.get_rng_state()
        expected, expected_opt = params_of(model), optim_state_of(model, optimizer)

        seed_all(100 + rank)
        fresh = sharded_model(mesh, seed=1)
        fresh_opt, fresh_sched = train_objects(fresh)
        assert load_checkpoint(latest_checkpoint(Path(tmp) / "ckpt"), fresh, fresh_opt, fresh_sched) == {"rank": rank}
        assert torch.equal(torch.get_rng_state(), rng)
        assert_bitwise(params_of(fresh), expected)
        assert_bitwise(optim_state_of(fresh, fresh_opt), expected_opt)
        assert fresh_sched.state_dict() == scheduler.state_dict()
        if rank == 0:
            torch.save(expected, Path(tmp) / "expected.pt")
            assert path == latest_checkpoint(Path(tmp) / "ckpt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads sometimes abort there ("terminate called ...")


def test_fsdp2_two_ranks_save_load_and_export(tmp_path):
    processes.start_ranks(_fsdp_worker, (2, str(tmp_path)), 2)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    path = step_dir(tmp_path / "ckpt", 2)
    model = Transformer(config_from_hf(TINY_MOE_CONFIG))
    model.init_weights(seed=7)
    out = export_hf(path, model, tmp_path / "hf")  # 2 sharded ranks -> 1 plain process
    assert_bitwise(params_of(load_pretrained(out)), expected)
