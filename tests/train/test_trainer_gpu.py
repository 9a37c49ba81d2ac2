"""The compiled trainer on a GPU: one compile for every packing an RL run throws at it, and the compiled step's
numbers are the eager step's."""

import pytest
import torch
from torch._dynamo.utils import counters

from leagues.train.trainer import Trainer, TrainerConfig
from tests.train.test_trainer import make_samples

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_gpu_trainer_compiles_once_for_every_packing():
    trainer = Trainer("tiny-moe", TrainerConfig(compile=True))
    assert trainer.compiled
    for seed in (0, 1):
        trainer.train_step(make_samples(8 + seed, seed=seed))
    graphs = counters["stats"]["unique_graphs"]
    for seed in (2, 3, 4):  # other lengths, other packings
        trainer.train_step(make_samples(8 + seed, seed=seed))
    assert counters["stats"]["unique_graphs"] == graphs


def test_gpu_compiled_logprobs_equal_eager():
    samples = make_samples(12, seed=5)
    compiled = Trainer("tiny-moe", TrainerConfig(compile=True)).compute_logprobs(samples)
    eager = Trainer("tiny-moe", TrainerConfig(compile=False)).compute_logprobs(samples)
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=0)


def test_gpu_compiled_padded_step_equals_eager():
    """Compiled for static sizes, micro-batches run padded to a multiple of 64 tokens (several buckets here):
    the step's loss and gradient norm are the eager step's."""
    samples = make_samples(40, seed=7)
    metrics = []
    for compiled in (True, False):
        cfg = TrainerConfig(compile=compiled, compile_pad_multiple=64, max_tokens_per_microbatch=160)
        trainer = Trainer("tiny-moe", cfg)
        assert len(trainer._microbatches(samples)) > 1
        metrics.append(trainer.train_step(samples))
    for key in ("loss", "grad_norm"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=2e-2, abs=1e-4), key


def test_gpu_compiled_step_under_fsdp_equals_eager():
    """As the loop runs it (a process group of one: FSDP2 with bf16 compute), the compiled blocks with attention
    traced in give the eager step's loss and gradient norm."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        samples = make_samples(40, seed=9)
        metrics = []
        for compiled in (True, False):
            trainer = Trainer("tiny-moe", TrainerConfig(compile=compiled, compile_pad_multiple=64))
            assert trainer.mesh is not None and trainer.compiled == compiled
            metrics.append(trainer.train_step(samples))
        for key in ("loss", "grad_norm"):
            assert metrics[0][key] == pytest.approx(metrics[1][key], rel=3e-2, abs=1e-4), key
    finally:
        dist.destroy_process_group()
