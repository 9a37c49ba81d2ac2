"""The colocated memory plan: the KV cache's size and the engine's sleep, from a device budget given in
bytes (no GPU needed: the plan is a function of the numbers), and the settings that reach it; the trainer's
models beside the policy (KL reference, distillation teacher, PPO's critic) in the budget of a fake GPU."""

import json
from pathlib import Path

import pytest
import torch

from leagues.config import apply_overrides
from leagues.loop import TrainConfig
from leagues.loop.memory import MemoryBudget, memory_budget, plan_engine_memory, trainer_state
from leagues.model import ModelConfig, Transformer, read_config
from leagues.parallel import activation_bytes, frozen_memory, trainer_memory
from leagues.parallel.mesh import ParallelConfig

GB = 10**9


def budget(**kw) -> MemoryBudget:
    values = dict(
        free=100 * GB,
        trainer_pending=20 * GB,
        activations=10 * GB,
        margin=5 * GB,
        need=4 * GB,
        minimum=1 * GB,
        cap=30 * GB,
        fraction=0.8,
    )
    return MemoryBudget(**(values | kw))


def test_auto_keeps_the_cache_beside_training_when_the_rollout_fits():
    plan = plan_engine_memory("auto", budget())
    assert not plan.sleep
    assert plan.kv_bytes == 30 * GB  # the cap: more could never be used at once
    plan = plan_engine_memory("auto", budget(cap=200 * GB))
    assert plan.kv_bytes == (100 - 20 - 10 - 5) * GB  # all that fits beside a training step
    assert "keeps" in plan.note


def test_auto_sleeps_when_the_rollout_does_not_fit_beside_training():
    plan = plan_engine_memory("auto", budget(activations=70 * GB, need=8 * GB))  # 5 GB beside, 8 needed
    assert plan.sleep
    assert plan.kv_bytes == 30 * GB  # while training the cache is released: fraction of free, capped
    plan = plan_engine_memory("auto", budget(activations=70 * GB, need=8 * GB, cap=500 * GB))
    assert plan.kv_bytes == (100 - 20 - 5) * GB  # the trainer's state stays resident beside the cache
    assert "do not fit together" in plan.note


def test_true_always_sleeps_and_false_fits_or_stops_naming_the_numbers():
    assert plan_engine_memory(True, budget()).sleep
    plan = plan_engine_memory(False, budget(activations=72 * GB))  # 3 GB beside: less than the rollout's 4
    assert not plan.sleep and plan.kv_bytes == 3 * GB  # but more than one sequence: it runs, with fewer at once
    with pytest.raises(ValueError) as err:
        plan_engine_memory(False, budget(activations=75 * GB, minimum=2 * GB))
    message = str(err.value)
    assert "engine_sleep false" in message and "100.0 GB free" in message and "0.0 GB for the KV cache" in message
    assert "engine_sleep to auto or true" in message and "max_tokens_per_microbatch" in message


def test_a_cache_too_small_for_one_sequence_stops_the_run():
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        plan_engine_memory(True, budget(free=30 * GB, trainer_pending=24 * GB, minimum=2 * GB))


def test_engine_sleep_takes_true_false_or_auto():
    assert TrainConfig().engine_sleep == "auto"
    assert apply_overrides(TrainConfig(), ["--engine_sleep", "false"]).engine_sleep is False
    assert apply_overrides(TrainConfig(), ["--engine_sleep", "true"]).engine_sleep is True
    with pytest.raises(ValueError, match="engine_sleep"):
        apply_overrides(TrainConfig(), ["--engine_sleep", "sometimes"])


def test_activations_grow_with_tokens_and_shrink_with_checkpointing():
    config = ModelConfig(
        family="qwen3_moe", vocab_size=1000, dim=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
        num_experts=8, top_k=2, expert_ffn_dim=128, moe_layers=(0, 1, 2, 3),
    )  # fmt: skip
    plain, checkpointed = ParallelConfig(), ParallelConfig(activation_checkpointing=True)
    small = activation_bytes(config, 1024, plain, logprob_chunk=512)
    assert activation_bytes(config, 4096, plain, logprob_chunk=512) > 3.5 * small
    assert activation_bytes(config, 4096, checkpointed, logprob_chunk=512) < activation_bytes(
        config, 4096, plain, logprob_chunk=512
    )
    # per token and MoE layer: attention 4*256+3*256+2*128 and experts 2*(2*256+3*128)+2*8, in bf16, x1.5
    per_token = (2048 + 2 * (512 + 384) + 16) * 4 * 2
    assert small == int(1.5 * (1024 * per_token + 512 * 1000 * 12))


# ---------------------------------------------------------------------------------------------------
# the trainer's models beside the policy (reference, teacher, critic), on a fake GPU of 141 GB

QWEN3_30B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 4096,
}  # fmt: skip
GPU = 141 * GB
EIGHT_GPUS = [
    "--trainer.parallel.ep", "8", "--trainer.parallel.activation_checkpointing", "true",
    "--trainer.max_tokens_per_microbatch", "2048", "--engine_ep", "true", "--engine.dtype", "bfloat16",
    "--engine.max_num_seqs", "1024",
]  # fmt: skip


@pytest.fixture
def models(tmp_path) -> dict[str, Path]:
    """Checkpoint directories (a config alone: the plan reads nothing else) of Qwen3-30B-A3B's shape with 48
    ("30b") and 12 ("12-layer") layers."""
    out = {}
    for name, layers in (("30b", 48), ("12-layer", 12)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(QWEN3_30B | {"num_hidden_layers": layers}))
        out[name] = tmp_path / name
    return out


def kv_beside(path: Path, *overrides: str, world: int = 8, grouped: bool = True, free: int = 130 * GB) -> int:
    """The KV cache a colocated run of `path` keeps beside training on a GPU with `free` bytes free and nothing
    allocated yet (what the trainer holds then is both allocated and gone from `free`, so the plan is the same)."""
    cfg = apply_overrides(TrainConfig(), [*EIGHT_GPUS, *overrides])
    budget = memory_budget(cfg, path, 100, world, free=free, total=GPU, allocated=0, grouped=grouped)
    plan = plan_engine_memory(False, budget)
    assert not plan.sleep and plan.kv_bytes < budget.cap  # what fits beside, not the cap: differences show
    return plan.kv_bytes


def test_a_sharded_reference_or_teacher_takes_its_bf16_shard_from_the_cache(models):
    """8 ranks with a process group: a frozen model of the policy's shape keeps its shard in bf16 on each device,
    half the policy's float32 master shard (about 30.5B / 8 parameters, 2 bytes each); what it gathers to score
    fits where the policy's gradients are between steps (full float32 gradients of a rank's share, twice its
    bf16 gather), so nothing else is taken."""
    plain = kv_beside(models["30b"])
    master = trainer_memory(read_config(models["30b"]), ParallelConfig(ep=8), 8)["params"]
    shard = master // 2
    assert 7.6e9 < shard < 7.65e9
    assert plain - kv_beside(models["30b"], "--trainer.loss.kl_coef", "0.1") == shard
    assert plain - kv_beside(models["30b"], "--distill.teacher", str(models["30b"])) == shard
    both = kv_beside(models["30b"], "--trainer.loss.kl_coef", "0.1", "--distill.teacher", str(models["30b"]))
    assert plain - both == 2 * shard
    # measured once the trainer is built, the shard is allocated and gone from the free memory: the same cache
    cfg = apply_overrides(TrainConfig(), [*EIGHT_GPUS, "--trainer.loss.kl_coef", "0.1"])
    built = memory_budget(cfg, models["30b"], 100, 8, free=130 * GB - shard, total=GPU, allocated=shard)
    assert plan_engine_memory(False, built).kv_bytes == plain - shard
    with_ref = kv_beside(models["30b"], "--trainer.loss.kl_coef", "0.1", "--trainer.parallel.cpu_offload", "true")
    assert with_ref == kv_beside(models["30b"], "--trainer.parallel.cpu_offload", "true")  # its shard on the host


def test_a_teacher_larger_than_the_student_also_takes_what_it_gathers_beyond_the_students_gradients(models):
    """A 48-layer teacher of a 12-layer student: to score, a rank gathers its share of the teacher in bf16 (every
    unit, with unsharded accumulation), more than the student's float32 gradients that are freed by then; the
    difference is taken from the cache too, besides the teacher's shard."""
    teacher = ["--distill.teacher", str(models["30b"])]
    parallel = ParallelConfig(ep=8)
    frozen = frozen_memory(read_config(models["30b"]), parallel, 8)
    student = trainer_memory(read_config(models["12-layer"]), parallel, 8)
    assert frozen["scoring"] > student["grads"]
    shrink = kv_beside(models["12-layer"]) - kv_beside(models["12-layer"], *teacher)
    assert shrink == frozen["resident"] + frozen["scoring"] - student["grads"]
    # by hand: the teacher's bf16 share is its dense parameters (embeddings, LM head, attention, routers; norms
    # are a few hundred thousand) and 16 of its 128 experts per layer
    share = 2 * 151936 * 2048 + 48 * (2048 * (4096 * 2 + 512 * 2) + 128 * 2048 + 16 * 3 * 2048 * 768)
    assert abs(frozen["scoring"] / 2 - share) < 1e6


def test_alone_a_frozen_model_is_whole_float32_on_the_device_resident_or_while_it_scores(models):
    """No process group (one GPU, a trainer built by hand): a reference kept on the device takes its whole
    float32 weights from the cache; offloaded (`trainer.ref_offload`, the default) it is whole on the device only
    while it scores, in the room of the policy's float32 gradients (the same size, for a reference), so a
    reference costs nothing more, and a teacher nearly 4 times the student's size costs the difference."""
    alone = dict(world=1, grouped=False, free=400 * GB)  # a fake device with room for whole float32 models
    one = ["--trainer.parallel.ep", "1", "--engine_ep", "false", "--engine.max_num_seqs", "4096"]
    with torch.device("meta"):
        numel = {
            name: sum(p.numel() for p in Transformer(read_config(path)).parameters()) for name, path in models.items()
        }
    plain = kv_beside(models["12-layer"], *one, **alone)
    kept = kv_beside(
        models["12-layer"], *one, "--trainer.loss.kl_coef", "0.1", "--trainer.ref_offload", "false", **alone
    )
    assert plain - kept == 4 * numel["12-layer"]
    assert kv_beside(models["12-layer"], *one, "--trainer.loss.kl_coef", "0.1", **alone) == plain
    teacher = kv_beside(models["12-layer"], *one, "--distill.teacher", str(models["30b"]), **alone)
    assert numel["30b"] > 3.5 * numel["12-layer"]
    assert plain - teacher == 4 * (numel["30b"] - numel["12-layer"])


def test_the_critic_is_planned_as_its_value_model_trained_like_the_policy(models):
    """PPO's critic: master weights, gradients, AdamW moments and gathered weights of the value model, which has a
    scalar head (2048 + 1 parameters) where the policy has its LM head (151936 x 2048)."""
    cfg = apply_overrides(TrainConfig(), [*EIGHT_GPUS, "--advantage.estimator", "gae"])
    parts = trainer_state(cfg, models["30b"], 8)
    assert set(parts) == {"policy", "critic"}
    # the LM head's bytes per rank: its 1/8 shard of master weights (4 bytes a parameter) and moments (8), and,
    # with unsharded accumulation, its whole float32 gradient (4) and bf16 gathered copy (2)
    head = 151936 * 2048
    assert parts["policy"] - parts["critic"] == pytest.approx((4 + 8) * head / 8 + (4 + 2) * head, rel=1e-3)
    critic = trainer_state(cfg, models["12-layer"], 8)["critic"]
    with_critic = kv_beside(models["12-layer"], "--advantage.estimator", "gae")
    assert with_critic == kv_beside(models["12-layer"], free=130 * GB - critic)


def test_a_teacher_that_does_not_fit_stops_the_run_naming_the_numbers(models):
    """The same run fits beside training without a teacher; with a 48-layer teacher (engine_sleep false) the plan
    stops before step 1 naming the teacher's part; with auto the engine sleeps instead; a GPU too small even for
    a sleeping engine's one sequence stops the run whatever the setting."""
    base = [*EIGHT_GPUS, "--trainer.parallel.grad_accumulation", "sharded"]
    with_teacher = [*base, "--distill.teacher", str(models["30b"])]
    path = models["12-layer"]

    def budget_of(overrides: list[str], free: int) -> MemoryBudget:
        cfg = apply_overrides(TrainConfig(), overrides)
        return memory_budget(cfg, path, 100, 8, free=free, total=GPU, allocated=0)

    free = GPU - budget_of(base, GPU).beside + 2 * GB  # 2 GB for the cache beside training, without the teacher
    assert plan_engine_memory(False, budget_of(base, free)).kv_bytes == 2 * GB
    budget = budget_of(with_teacher, free)
    with pytest.raises(ValueError) as err:
        plan_engine_memory(False, budget)
    message = str(err.value)
    teacher = budget.parts["teacher"]
    assert 7.6e9 < teacher < 7.65e9  # the 48-layer teacher's bf16 shard, as the 30B policy's
    assert f"teacher {teacher / GB:.1f}" in message and f"policy {budget.parts['policy'] / GB:.1f}" in message
    assert "engine_sleep false" in message and f"{budget.free / GB:.1f} GB free" in message
    assert plan_engine_memory("auto", budget).sleep
    weights = free - budget.free  # the engine's, still to load when the budget is measured
    tight = budget_of(with_teacher, weights + budget.trainer_pending + budget.margin + budget.minimum // 2)
    with pytest.raises(ValueError, match=r"cannot hold one sequence .*teacher 7\.6"):
        plan_engine_memory(True, tight)
