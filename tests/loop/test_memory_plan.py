"""The colocated memory plan: the KV cache's size and the engine's sleep, from a device budget given in
bytes (no GPU needed: the plan is a function of the numbers), and the settings that reach it."""

import pytest

from leagues.config import apply_overrides
from leagues.loop import TrainConfig
from leagues.loop.memory import MemoryBudget, plan_engine_memory
from leagues.model import ModelConfig
from leagues.parallel import activation_bytes
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
