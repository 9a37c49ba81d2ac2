"""FSDP2 and expert parallel against the single-process model, on 2 gloo ranks on the CPU.

Each test starts 2 ranks (forked from a preloaded server, `tests/processes.py`). Both build the same seeded
model; each rank trains on its own packed sequences, with loss = (cross-entropy summed over its tokens) /
(tokens over both ranks), so the sum of the ranks' losses is the global loss. Every rank also runs the
single-process reference (the unsharded model on the union of both ranks' sequences, one packed batch) locally,
and compares: logits, the full parameters after one SGD step with lr 1 (so a wrong gradient shows at its own
scale), and `full_state_dict`.
"""

import os
import socket
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from leagues.model import ForwardBatch, Transformer, config_from_hf
from leagues.parallel import ParallelConfig, apply_ep, build_mesh, full_state_dict, parallelize, unit_buckets
from tests import processes

CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 64,
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
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}
LENGTHS = [[5, 7], [3, 9, 4]]  # per rank: different sequences and token counts
WORLD = 2
TOL = 1e-5


# ---------------------------------------------------------------- process machinery


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, fn) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads sometimes abort there ("terminate called ...")


def spawn(fn) -> None:
    processes.start_ranks(_worker, (free_port(), fn), WORLD)


# ---------------------------------------------------------------- model, data, loss


def make_model() -> Transformer:
    model = Transformer(config_from_hf(CONFIG))
    model.init_weights(seed=0, std=0.2)  # large enough that routing is far from uniform
    model.set_moe_impl("reference")
    return model


def rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    lengths = LENGTHS[rank]
    gen = torch.Generator().manual_seed(100 + rank)
    ids_T = torch.randint(0, CONFIG["vocab_size"], (sum(lengths),), generator=gen)
    targets_T = torch.randint(0, CONFIG["vocab_size"], (sum(lengths),), generator=gen)
    return ids_T, targets_T, lengths


def union_data() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    parts = [rank_data(r) for r in range(WORLD)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), sum((p[2] for p in parts), [])


def loss_of(model: Transformer, ids_T, targets_T, lengths) -> torch.Tensor:
    """Cross-entropy summed over the tokens / tokens over all ranks; logits in two vocab-free chunks of tokens,
    through `model.logits`, as the trainer computes them."""
    hidden_TD = model.run(ForwardBatch.packed(ids_T, lengths, compute_logits=False)).hidden_TD
    num_total = sum(map(sum, LENGTHS))
    half = hidden_TD.shape[0] // 2
    chunks = [(hidden_TD[:half], targets_T[:half]), (hidden_TD[half:], targets_T[half:])]
    return sum(F.cross_entropy(model.logits(h), t, reduction="sum") for h, t in chunks) / num_total


def sgd_step(model: torch.nn.Module, lr: float = 1.0) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param -= lr * param.grad


def reference_after_step(lr: float = 1.0) -> dict[str, torch.Tensor]:
    model = make_model()
    loss_of(model, *union_data()).backward()
    sgd_step(model, lr)
    return {name: p.detach() for name, p in model.named_parameters()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape, name
        err = (got[name] - want[name]).abs().max().item()
        assert err <= TOL, f"{name}: max abs error {err}"


# ---------------------------------------------------------------- rank bodies


def train_one_step(rank: int, cfg: ParallelConfig) -> None:
    model = make_model()
    parallelize(model, cfg, WORLD, "cpu")
    loss_of(model, *rank_data(rank)).backward()
    sgd_step(model)
    # "mean" is the sum's gradient over the world size, for expert and non-expert parameters alike.
    ref_lr = 1.0 if cfg.grad_reduce == "sum" else 1.0 / WORLD
    assert_same(dict(full_state_dict(model)), reference_after_step(ref_lr))


def ep_forward(rank: int) -> None:
    model, reference = make_model(), make_model()
    apply_ep(model, build_mesh(ParallelConfig(ep=WORLD), WORLD, "cpu").ep)
    assert model.layers[0].moe.experts.w13.shape[0] == CONFIG["num_experts"] // WORLD
    ids_T, _, lengths = rank_data(rank)
    logits_TV = model.run(ForwardBatch.packed(ids_T, lengths)).logits_TV
    want_TV = reference.run(ForwardBatch.packed(ids_T, lengths)).logits_TV
    assert (logits_TV - want_TV).abs().max().item() <= TOL


def gather_full(rank: int) -> None:
    model = make_model()
    parallelize(model, ParallelConfig(ep=WORLD, activation_checkpointing=True), WORLD, "cpu")
    want = {name: p.detach() for name, p in make_model().named_parameters()}
    got = dict(full_state_dict(model, bucket_bytes=4096))
    assert list(got) == list(want)
    assert_same(got, want)


def gather_by_unit(rank: int) -> None:
    model = make_model()
    parallelize(model, ParallelConfig(ep=WORLD, activation_checkpointing=True), WORLD, "cpu")
    loss_of(model, *rank_data(rank)).backward()  # after a step's forward/backward, as in the loop
    sgd_step(model)
    want = dict(full_state_dict(model))
    got, buckets = {}, 0
    for bucket in unit_buckets(model):
        got |= {name: t.clone() for name, t in bucket}  # copied before the next unit is gathered
        buckets += 1
    assert buckets == 1 + 2 * CONFIG["num_hidden_layers"]  # the root, each block and each block's experts
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name  # float32 on CPU: the very same values
    # the units are sharded again: a second forward/backward still works
    loss_of(model, *rank_data(rank)).backward()


def trainer_from_checkpoint(rank: int, path: str, ep: int, teacher: str) -> None:
    from leagues.model import load_pretrained
    from leagues.train import LossConfig, Trainer, TrainerConfig

    parallel = ParallelConfig(ep=ep, activation_checkpointing=True, sharded_load=True)
    trainer = Trainer(path, TrainerConfig(parallel=parallel, loss=LossConfig(kl_coef=0.1)), teacher=teacher)
    # the KL reference and the distillation teacher are read in pieces and sharded like the policy
    for model, source in ((trainer.model, path), (trainer.ref, path), (trainer.teacher, teacher)):
        want = {name: p.detach() for name, p in load_pretrained(source).named_parameters()}
        assert not any(p.is_meta for p in model.parameters())
        got = dict(full_state_dict(model))
        assert sorted(got) == sorted(want)
        for name in want:
            assert torch.equal(got[name], want[name]), name
    assert torch.equal(trainer.model.rope.inv_freq, load_pretrained(path).rope.inv_freq)


def memory_as_planned(rank: int, ep: int) -> None:
    from leagues.parallel.memory import trainer_memory
    from leagues.train.optim import OptimConfig, build_optimizer

    model = make_model()
    cfg = ParallelConfig(ep=ep, grad_accumulation="sharded")
    plan = trainer_memory(model.config, cfg, WORLD)
    parallelize(model, cfg, WORLD, "cpu")
    local = lambda tensors: sum(t.to_local().numel() * t.element_size() for t in tensors)  # noqa: E731
    assert local(model.parameters()) == plan["params"]
    loss_of(model, *rank_data(rank)).backward()
    assert local(p.grad for p in model.parameters()) == plan["grads"]
    optimizer = build_optimizer(model.parameters(), OptimConfig())
    optimizer.step()
    moments = [state[k] for state in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert local(moments) == plan["optimizer"]


def frozen_as_planned(rank: int, ep: int, accumulation: str) -> None:
    """A trainer's KL reference holds what `frozen_memory` plans: its shard between uses (resharded after scoring,
    though no backward does it), at most its gathered units while it scores (all of them with unsharded
    accumulation); the critic's value model holds `trainer_memory`'s master shards of its own shape."""
    from torch.distributed.tensor import DTensor

    from leagues.parallel.memory import frozen_memory, trainer_memory
    from leagues.train import LossConfig, Trainer, TrainerConfig
    from leagues.train.critic import CriticConfig, ValueModel
    from leagues.types import Sample

    cfg = ParallelConfig(ep=ep, grad_accumulation=accumulation)
    trainer = Trainer(make_model(), TrainerConfig(parallel=cfg, loss=LossConfig(kl_coef=0.1)), critic=CriticConfig())
    plan = frozen_memory(trainer.model.config, cfg, WORLD, compute_bytes=4)  # the CPU computes in float32
    local = lambda tensors: sum(t.to_local().numel() * t.element_size() for t in tensors)  # noqa: E731
    gathered = []  # bytes of the reference's unsharded parameters, after each of its modules' forward
    for module in trainer.ref.modules():
        module.register_forward_hook(
            lambda *_: gathered.append(
                sum(4 * p.numel() for p in trainer.ref.parameters() if not isinstance(p, DTensor))
            )
        )
    samples = [Sample(prompt_ids=[5, 17, 33], response_ids=[40, 41, 42], rollout_logprobs=[0.0] * 3)] * (rank + 1)
    trainer.kl_rewards(samples)  # the policy's and the reference's logprobs
    assert all(isinstance(p, DTensor) for p in trainer.ref.parameters())
    assert local(trainer.ref.parameters()) == plan["resident"]
    if accumulation == "unsharded":
        assert max(gathered) == plan["scoring"]
    else:
        assert 0 < max(gathered) <= plan["scoring"] < local(trainer.ref.parameters()) * WORLD
    with torch.device("meta"):
        shapes = ValueModel(trainer.model.config)
    critic = trainer_memory(shapes, cfg, WORLD)["params"]
    # the plan counts FSDP's padded shards: the value head's one row is rank 0's, rank 1's piece is padding
    padding = 0 if rank == 0 else 4 * (trainer.model.config.dim + 1)
    assert local(trainer.critic.model.parameters()) + padding == critic


# ---------------------------------------------------------------- tests


def test_fsdp_step_matches_single_process():
    spawn(partial(train_one_step, cfg=ParallelConfig(ep=1)))


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_fsdp_ep_step_matches_single_process(activation_checkpointing):
    spawn(partial(train_one_step, cfg=ParallelConfig(ep=2, activation_checkpointing=activation_checkpointing)))


def test_fsdp_ep_mean_reduction_is_the_sum_over_world_size():
    spawn(partial(train_one_step, cfg=ParallelConfig(ep=2, grad_reduce="mean")))


def test_ep_forward_matches_single_process():
    spawn(ep_forward)


def test_full_state_dict_matches_single_process():
    spawn(gather_full)


def test_unit_buckets_equal_the_full_state_dict():
    spawn(gather_by_unit)


@pytest.mark.parametrize("ep", [1, 2])
def test_a_sharded_trainer_reads_only_its_pieces_of_the_checkpoint(ep, tmp_path):
    from leagues.model import save_pretrained

    save_pretrained(make_model(), tmp_path / "model")
    teacher = make_model()
    teacher.init_weights(seed=1, std=0.2)
    save_pretrained(teacher, tmp_path / "teacher")
    spawn(partial(trainer_from_checkpoint, path=str(tmp_path / "model"), ep=ep, teacher=str(tmp_path / "teacher")))


@pytest.mark.parametrize("ep", [1, 2])
def test_memory_plan_matches_what_each_rank_holds(ep):
    """Master weights, sharded gradients and AdamW's moments, per rank, as `trainer_memory` plans them."""
    spawn(partial(memory_as_planned, ep=ep))


@pytest.mark.parametrize(("ep", "accumulation"), [(1, "unsharded"), (2, "unsharded"), (2, "sharded")])
def test_frozen_model_and_critic_hold_what_the_memory_plan_says(ep, accumulation):
    spawn(partial(frozen_as_planned, ep=ep, accumulation=accumulation))


def test_memory_plan_of_the_30b_shape():
    """The plan's arithmetic at full size: Qwen3-30B-A3B over 8 ranks holds 1/8 of 30.5B parameters,
    16 bytes each with sharded gradients; unsharded accumulation adds a rank's gathered share."""
    from leagues.parallel.memory import trainer_memory

    hf = CONFIG | {"vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32}
    hf |= {"num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8}
    hf |= {"moe_intermediate_size": 768, "intermediate_size": 6144}
    config = config_from_hf(hf)
    sharded = trainer_memory(config, ParallelConfig(ep=8, grad_accumulation="sharded"), 8)
    assert 30.4e9 < sharded["params"] / 4 * 8 < 30.6e9
    assert sharded["params"] + sharded["grads"] + sharded["optimizer"] == 16 * sharded["params"] // 4
    unsharded = trainer_memory(config, ParallelConfig(ep=8), 8)
    dense = 2 * 151936 * 2048 + 48 * (2048 * (4096 * 2 + 512 * 2) + 128 * 2048)  # embeddings, attention, routers
    experts_local = 48 * 16 * 3 * 2048 * 768  # 16 of 128 experts per rank
    assert abs(unsharded["gathered"] / 2 - (dense + experts_local)) < 1e6  # norms: a few hundred thousand
    offloaded = trainer_memory(config, ParallelConfig(ep=8, grad_accumulation="sharded", cpu_offload=True), 8)
    assert offloaded["host"] == sharded["params"] + sharded["grads"] + sharded["optimizer"]
    assert offloaded["device"] == sharded["gathered"]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="ep"):
        ParallelConfig(ep=0)
    with pytest.raises(ValueError, match="param_dtype"):
        ParallelConfig(param_dtype="fp8")
    with pytest.raises(ValueError, match=r"ep \(3\) must divide the world size \(2\)"):
        build_mesh(ParallelConfig(ep=3), 2, "cpu")


def test_ep_must_divide_the_experts():
    class ThreeRanks:  # apply_ep checks divisibility before touching any process group
        def size(self) -> int:
            return 3

    with pytest.raises(ValueError, match=r"ep \(3\) must divide the number of experts \(4\)"):
        apply_ep(make_model(), ThreeRanks())
