"""The trainer on 2 gloo ranks (FSDP2, and FSDP2 + expert parallel) against one process, with PPO's critic too."""

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist

from leagues.model import Transformer, config_from_hf
from leagues.parallel import ParallelConfig, full_state_dict
from leagues.train.critic import CriticConfig
from leagues.train.losses import LossConfig
from leagues.train.optim import OptimConfig
from leagues.train.trainer import Trainer, TrainerConfig
from tests import processes

from .test_trainer import make_samples

CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}


def make_trainer(ep: int = 1, num_minibatches: int = 1, kl_coef: float = 0.0, critic: bool = False) -> Trainer:
    model = Transformer(config_from_hf(CONFIG))
    model.init_weights(seed=0, std=0.2)
    model.set_moe_impl("reference")
    cfg = TrainerConfig(
        loss=LossConfig(off_policy="token_tis", kl_coef=kl_coef, kl_estimator="k3"),
        optim=OptimConfig(lr=1e-2, grad_clip=0.05),
        parallel=ParallelConfig(ep=ep),
        max_tokens_per_microbatch=24,
        num_minibatches=num_minibatches,
    )
    value = CriticConfig(optim=OptimConfig(lr=1e-2, grad_clip=0.05), value_clip=0.05) if critic else None
    return Trainer(model, cfg, critic=value)


def full_params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: t.clone() for bucket in trainer.state_dict_for_sync() for name, t in bucket}


def full_critic(trainer: Trainer) -> dict[str, torch.Tensor]:
    model = trainer.critic.model
    named = full_state_dict(model) if trainer.mesh is not None else model.named_parameters()
    return {name: t.detach().clone() for name, t in named}


def with_value_targets(trainer: Trainer, samples) -> list:
    """The loop's part before a step with a critic: the batch's values, then returns and per-token advantages
    (here fixed functions of the sample and its values, as GAE's would be)."""
    for i, (sample, values) in enumerate(zip(samples, trainer.compute_values(samples), strict=True)):
        sample.values = values.tolist()
        sample.returns = [v + (0.5 if sample.group_id % 2 else -0.5) for v in sample.values]
        sample.token_advantages = [float(i % 3) - 1.0 + 0.1 * t for t in range(len(values))]
    return samples


def _worker(rank: int, port: int, ep: int, num_minibatches: int, kl_coef: float, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        trainer = make_trainer(ep, num_minibatches, kl_coef)
        samples = make_samples(12, seed=3)
        local = samples[rank::2]  # each rank brings its own half; the trainer rebalances by tokens
        metrics = trainer.train_step(local)
        params = full_params(trainer)
        if rank == 0:
            torch.save({"params": params, "metrics": metrics}, os.path.join(out_dir, "result.pt"))
        dist.barrier()  # neither rank tears the group down while the other still talks
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads sometimes abort there ("terminate called ...")


@contextlib.contextmanager
def one_thread():
    """Run as the ranks do (`torch.set_num_threads(1)`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(("ep", "num_minibatches", "kl_coef"), [(1, 1, 0.0), (2, 1, 0.0), (1, 3, 0.0), (2, 2, 0.5)])
def test_two_ranks_match_one_process(ep, num_minibatches, kl_coef, tmp_path):
    """Mini-batches are cut from the global batch in rank order, so one process given that order makes the
    same updates; with a KL term, the reference's logprobs are the same on any split too."""
    processes.start_ranks(_worker, (free_port(), ep, num_minibatches, kl_coef, str(tmp_path)), 2)
    got = torch.load(tmp_path / "result.pt")
    with one_thread():  # the ranks' reduction order: with more threads Adam magnifies the last bits of ~0 gradients
        single = make_trainer(num_minibatches=num_minibatches, kl_coef=kl_coef)
        samples = make_samples(12, seed=3)
        metrics = single.train_step(samples[0::2] + samples[1::2])
        want = full_params(single)
    assert set(got["params"]) == set(want)
    for name, tensor in want.items():  # 1e-4: 1% of one Adam step (lr 1e-2). Adam's normalised update turns the
        # last bits of a near-zero gradient, summed in another order on two ranks, into up to ~3e-5
        torch.testing.assert_close(got["params"][name], tensor, rtol=0, atol=1e-4, msg=name)
    assert abs(got["metrics"]["loss"] - metrics["loss"]) < 1e-5
    if kl_coef:  # the second mini-batch's update starts away from the reference
        assert got["metrics"]["kl/mean"] > 0 and abs(got["metrics"]["kl/mean"] - metrics["kl/mean"]) < 1e-6


def _resume_worker(rank: int, port: int, out_dir: str) -> None:
    """EP 2, with a critic: step, save, step; a fresh trainer loads the save and steps: policy and critic both end
    bit for bit equal."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        first, second = make_samples(8, seed=5)[rank::2], make_samples(8, seed=6)[rank::2]
        trainer = make_trainer(ep=2, critic=True)
        trainer.train_step(with_value_targets(trainer, first))
        saved = full_params(trainer)
        path = trainer.save(os.path.join(out_dir, "ckpt"), extra={"position": 11})
        trainer.train_step(with_value_targets(trainer, second))
        straight, straight_critic = full_params(trainer), full_critic(trainer)
        resumed = make_trainer(ep=2, critic=True)
        assert resumed.load(path) == {"position": 11}
        resumed.train_step(with_value_targets(resumed, second))
        for name, tensor in full_params(resumed).items():
            assert torch.equal(tensor, straight[name]), name
        for name, tensor in full_critic(resumed).items():
            assert torch.equal(tensor, straight_critic[name]), name
        if rank == 0:
            torch.save({"saved": saved, "path": str(path)}, os.path.join(out_dir, "resume.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads sometimes abort there ("terminate called ...")


def test_expert_parallel_checkpoint_resumes_bitwise_and_exports(tmp_path):
    from leagues.train.checkpoint import export_hf

    processes.start_ranks(_resume_worker, (free_port(), str(tmp_path)), 2)
    got = torch.load(tmp_path / "resume.pt")
    model = Transformer(config_from_hf(CONFIG | {"architectures": ["Qwen3MoeForCausalLM"]}))
    model.init_weights(seed=9)
    export_hf(got["path"], model, tmp_path / "hf")
    for name, param in model.named_parameters():  # the two expert slices are stitched back together
        assert torch.equal(param, got["saved"][name]), name


def _critic_worker(rank: int, port: int, ep: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        trainer = make_trainer(ep, num_minibatches=2, critic=True)
        local = with_value_targets(trainer, make_samples(12, seed=7)[rank::2])
        metrics = trainer.train_step(local)
        result = {"values": [s.values for s in local], "critic": full_critic(trainer), "metrics": metrics}
        torch.save(result, os.path.join(out_dir, f"critic{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads sometimes abort there ("terminate called ...")


@pytest.mark.parametrize("ep", [1, 2])
def test_critic_two_ranks_match_one_process(ep, tmp_path):
    """The critic's values of each rank's samples, then a step of two mini-batches (FSDP2, with expert parallel):
    the same values, critic weights and critic metrics as one process."""
    processes.start_ranks(_critic_worker, (free_port(), ep, str(tmp_path)), 2)
    ranks = [torch.load(tmp_path / f"critic{rank}.pt") for rank in range(2)]
    with one_thread():
        single = make_trainer(num_minibatches=2, critic=True)
        samples = make_samples(12, seed=7)
        samples = with_value_targets(single, samples[0::2] + samples[1::2])
        metrics = single.train_step(samples)
    values = ranks[0]["values"] + ranks[1]["values"]
    for got, want in zip(values, [s.values for s in samples], strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-5)
    want = full_critic(single)
    assert set(ranks[0]["critic"]) == set(want) and "value_head.weight" in want
    for name, tensor in want.items():  # two AdamW steps at lr 1e-2 carry the sums' round-off a little further
        torch.testing.assert_close(ranks[0]["critic"][name], tensor, rtol=0, atol=5e-5, msg=name)
    for key in ("critic/value_loss", "critic/explained_variance", "critic/value_mean", "critic/clip_frac"):
        assert abs(ranks[0]["metrics"][key] - metrics[key]) < 1e-5, key
    assert metrics["critic/clip_frac"] > 0  # the second mini-batch's values moved past the clip
