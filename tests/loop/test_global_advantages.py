"""Advantages over the global batch: on 2 gloo ranks, REINFORCE++'s batch whitening and GRPO's group statistics
equal one process's over every rank's samples (groups are numbered per rank and stay apart)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist

from leagues.loop import TrainConfig
from leagues.loop.train import assign_advantages
from leagues.train.advantages import AdvantageConfig
from leagues.types import Sample
from tests import processes


def rank_samples(rank: int) -> list[Sample]:
    """Rank r's samples: 3 groups of 4, numbered 0..2 on every rank, rewards of different scale per rank."""
    gen = torch.Generator().manual_seed(rank)
    rewards = (torch.rand(12, generator=gen) * (1 + 4 * rank)).tolist()
    return [Sample(prompt_ids=[1], response_ids=[2], reward=r, group_id=i // 4) for i, r in enumerate(rewards)]


def _worker(rank: int, port: int, name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        samples = rank_samples(rank)
        assign_advantages(samples, TrainConfig(advantage=AdvantageConfig(estimator=name)))
        torch.save([s.advantage for s in samples], os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


@pytest.mark.parametrize("name", ["reinforce_pp", "grpo"])
def test_two_ranks_equal_one_process_over_the_global_batch(name, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes.start_ranks(_worker, (port, name, str(tmp_path)), 2)
    got = torch.load(tmp_path / "rank0.pt") + torch.load(tmp_path / "rank1.pt")
    everything = rank_samples(0) + [
        Sample(prompt_ids=[1], response_ids=[2], reward=s.reward, group_id=s.group_id + 100) for s in rank_samples(1)
    ]
    assign_advantages(everything, TrainConfig(advantage=AdvantageConfig(estimator=name)))
    torch.testing.assert_close(torch.tensor(got), torch.tensor([s.advantage for s in everything]))
    if name == "reinforce_pp":  # whitened over both ranks: rank 1's larger rewards are not its own mean 0
        assert abs(sum(got[12:])) > 1.0


def test_failed_aborted_and_empty_samples_are_not_trained_on():
    from leagues.loop.train import trainable
    from leagues.types import SampleStatus

    kept = Sample(prompt_ids=[1], response_ids=[2], status=SampleStatus.TRUNCATED)
    left_out = [
        Sample(prompt_ids=[1], response_ids=[2], status=SampleStatus.ABORTED),
        Sample(prompt_ids=[1], response_ids=[2], status=SampleStatus.FAILED),
        Sample(prompt_ids=[1], response_ids=[], status=SampleStatus.COMPLETED),
    ]
    assert trainable([kept, *left_out]) == [kept]


def test_disaggregated_engines_groups_stay_apart():
    """Two engines each number their groups 0, 1: merged, the ids are unique and every advantage is the one of its
    true group (computed over that engine's group alone)."""
    from leagues.loop.disaggregated import merge_batches
    from leagues.train.advantages import AdvantageInputs, compute_advantages

    batches = [rank_samples(0)[:8], rank_samples(1)[:8]]  # groups 0 and 1 of 4 samples on each engine
    want = []
    for batch in batches:
        rewards = torch.tensor([s.reward for s in batch])
        groups = torch.tensor([s.group_id for s in batch])
        inputs = AdvantageInputs(rewards_N=rewards, group_ids_N=groups)
        want += compute_advantages(inputs, AdvantageConfig(estimator="grpo"))[0].tolist()
    merged = merge_batches(batches)
    assert len({s.group_id for s in merged}) == 4
    assign_advantages(merged, TrainConfig(advantage=AdvantageConfig(estimator="grpo")))
    torch.testing.assert_close(torch.tensor([s.advantage for s in merged]), torch.tensor(want))
    # with the engines' own ids, engine 1's group 0 would share engine 0's group 0 statistics
    unmerged = rank_samples(0)[:8] + rank_samples(1)[:8]
    assign_advantages(unmerged, TrainConfig(advantage=AdvantageConfig(estimator="grpo")))
    assert not torch.allclose(torch.tensor([s.advantage for s in unmerged]), torch.tensor(want))
