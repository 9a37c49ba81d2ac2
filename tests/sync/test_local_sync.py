"""Weight sync inside a job: after a training step and a sync, the engine's logprobs for a fixed sequence
equal the trainer's (float32, <= 1e-5) and the engine stamps the new version; the broadcast path (trainer
rank -> engine rank over a real gloo group) lands exactly the sent weights."""

import os

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

from leagues.engine import Engine, SamplingParams
from leagues.model import resolve_model_path, write_tiny_moe
from leagues.parallel import ParallelConfig, build_mesh
from leagues.sync import WEIGHT_SYNCS, BroadcastSync
from leagues.train import LossConfig, OptimConfig, Trainer, TrainerConfig
from leagues.types import Sample
from tests import processes
from tests.sync.test_distributed import free_port

PROMPT = [5, 17, 33, 42, 8]


def _engine_logprobs(engine: Engine):
    """Greedy continuation of PROMPT with its logprobs and version."""
    params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    out = engine.generate([PROMPT], params)[0]
    return out.token_ids, out.logprobs, out.weight_version


def test_in_place_sync_engine_logprobs_equal_trainer_logprobs():
    path = resolve_model_path("tiny-moe")
    trainer = Trainer(path, TrainerConfig(loss=LossConfig(policy_loss="reinforce"), optim=OptimConfig(lr=1e-2)))
    engine = Engine(path, num_blocks=64, device="cpu", dtype="float32")
    try:
        tokens_before, _, version = _engine_logprobs(engine)
        assert version == 0
        batch = [Sample(prompt_ids=PROMPT, response_ids=tokens_before, advantage=-1.0) for _ in range(4)]
        trainer.train_step(batch)  # push the greedy answer's probability down: the weights change
        metrics = WEIGHT_SYNCS["in_place"](engine).push(trainer, version=1)  # the RL loop's transport
        assert metrics["sync/gb"] > 0
        tokens, logprobs, version = _engine_logprobs(engine)
        assert version == 1
        want = trainer.compute_logprobs([Sample(prompt_ids=PROMPT, response_ids=tokens)])[0]
        torch.testing.assert_close(torch.tensor(logprobs), want, rtol=0, atol=1e-5)
    finally:
        engine.close()


def _broadcast_rank(rank: int, port: int, second: str, results) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        sync = BroadcastSync(dist.new_group([0, 1]), src=0)
        mesh = build_mesh(ParallelConfig(), 1, "cpu", ranks=[0])  # the trainer's own: every rank makes its groups
        if rank == 0:
            trainer = Trainer(second, TrainerConfig(), mesh=mesh)
            sync.send(trainer.state_dict_for_sync(bucket_bytes=64 * 1024), version=3)  # several buckets
        else:
            engine = Engine(resolve_model_path("tiny-moe"), num_blocks=64, device="cpu", dtype="float32")
            try:
                results.put((sync.receive(engine), _engine_logprobs(engine)))
            finally:
                engine.close()
    finally:
        dist.destroy_process_group()


def test_broadcast_sync_lands_the_sent_weights(tmp_path):
    second = write_tiny_moe(tmp_path / "second", seed=1)
    ctx = processes.context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_broadcast_rank, args=(r, port, str(second), results)) for r in range(2)]
    for p in procs:
        p.start()
    version, (tokens, logprobs, out_version) = results.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert version == 3 and out_version == 3
    reference = Engine(second, num_blocks=64, device="cpu", dtype="float32")
    try:
        want_tokens, want_logprobs, _ = _engine_logprobs(reference)
    finally:
        reference.close()
    assert tokens == want_tokens
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(want_logprobs), rtol=0, atol=1e-6)


def test_every_weight_sync_is_registered_and_frozen_engines_get_nothing():
    assert set(WEIGHT_SYNCS) == {"in_place", "broadcast", "distributed", "disk", "none"}
    assert WEIGHT_SYNCS["none"]().push(trainer=None, version=3) == {}


def _one_rank_sync(port: int, results) -> None:
    """A trainer on a process group of one rank (as `leagues train` on one GPU), bf16 compute copies beside
    float32 masters, and two bf16 engines: one filled by the run's transport (one bucket of the compute copies
    themselves), one per tensor from the float32 masters, cast by the engine as it loads them."""
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        path = resolve_model_path("tiny-moe")
        cfg = TrainerConfig(optim=OptimConfig(lr=1e-2), parallel=ParallelConfig(param_dtype="bfloat16"))
        trainer = Trainer(path, cfg)
        trainer.train_step([Sample(prompt_ids=PROMPT, response_ids=[3, 4, 5], advantage=1.0) for _ in range(2)])
        fast, slow = (Engine(path, num_blocks=64, device="cpu", dtype="bfloat16") for _ in range(2))
        try:
            buckets = list(trainer.state_dict_for_sync(dtype=torch.bfloat16))
            metrics = WEIGHT_SYNCS["in_place"](fast).push(trainer, version=2)
            for name, tensor in trainer.model.named_parameters():
                slow.load_weights([(name.replace(_CHECKPOINT_PREFIX, ""), tensor.detach().clone())], version=2)
            want = dict(slow.model.named_parameters())
            unequal = [n for n, p in fast.model.named_parameters() if not torch.equal(p, want[n])]
            start = dict(Engine(path, num_blocks=8, device="cpu", dtype="bfloat16").model.named_parameters())
            moved = [n for n, p in fast.model.named_parameters() if not torch.equal(p, start[n])]
            numel = sum(p.numel() for p in fast.model.parameters())
            summary = (len(buckets), str(buckets[0][0][1].dtype), metrics["sync/gb"], numel, len(want))
            results.put(summary + (unequal, len(moved)))
        finally:
            fast.close()
            slow.close()
    finally:
        dist.destroy_process_group()


def test_one_rank_sync_hands_over_the_compute_copies_and_lands_the_masters_cast():
    ctx = processes.context()
    results = ctx.Queue()
    proc = ctx.Process(target=_one_rank_sync, args=(free_port(), results))
    proc.start()
    num_buckets, dtype, gb, numel, num_params, unequal, moved = results.get(timeout=120)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert num_buckets == 1 and dtype == "torch.bfloat16"  # the forward's own bf16 copies, no gather, no cast
    assert abs(gb - numel * 2 / 1e9) < 1e-9  # what lands: bf16 bytes
    assert unequal == []  # bit for bit the masters as a cast rounds them
    assert moved > num_params // 2  # the step changed the weights, so the comparison means something
