"""Rollout routing replay (R3): the engine's recorded routes reach the trainer and are replayed exactly;
without replay the trainer measures how often it routes differently; bad route records raise."""

import pytest
import torch

from leagues.engine import Engine, SamplingParams
from leagues.model import ForwardBatch, resolve_model_path
from leagues.train import LossConfig, OptimConfig, Trainer, TrainerConfig
from leagues.train.moe import MoEConfig, route_mismatch_frac
from leagues.train.packing import build_microbatch
from leagues.types import Sample

PROMPTS = [[5, 17, 33, 42, 8], [9, 9, 12], [70, 3, 3, 3, 3, 3, 21]]


def rollout_samples(path) -> list[Sample]:
    """Sampled responses with the engine's rollout logprobs and routes."""
    engine = Engine(path, num_blocks=64, device="cpu", dtype="float32")
    try:
        params = SamplingParams(temperature=1.0, seed=3, max_new_tokens=6, ignore_eos=True, return_routed_experts=True)
        outs = engine.generate(PROMPTS, params)
    finally:
        engine.close()
    return [
        Sample(prompt_ids=p, response_ids=o.token_ids, rollout_logprobs=o.logprobs, routed_experts=o.routed_experts,
               advantage=1.0 if i % 2 else -1.0)
        for i, (p, o) in enumerate(zip(PROMPTS, outs, strict=True))
    ]  # fmt: skip


def trainer(path, replay: str, lr: float = 1e-3) -> Trainer:
    cfg = TrainerConfig(
        loss=LossConfig(policy_loss="reinforce"), optim=OptimConfig(lr=lr), moe=MoEConfig(routing_replay=replay)
    )
    return Trainer(path, cfg)


def test_replayed_routes_equal_the_engines_for_every_token():
    path = resolve_model_path("tiny-moe")
    samples = rollout_samples(path)
    t = trainer(path, "rollout", lr=0.5)
    t.train_step(samples)  # a large step: the trainer's own routing now differs from the engine's
    mb = build_microbatch(samples, list(range(len(samples))), "cpu")
    engine_routes = mb.replay_experts_TLK
    with torch.no_grad():
        own = t.model.run(ForwardBatch.packed(mb.input_ids_T, mb.lengths, capture_experts=True)).routed_experts_TLK
        replayed = t.model.run(
            ForwardBatch.packed(mb.input_ids_T, mb.lengths, capture_experts=True, replay_experts_TLK=engine_routes)
        ).routed_experts_TLK
    assert torch.equal(replayed.long(), engine_routes.long())  # every token, every MoE layer
    assert route_mismatch_frac(own, engine_routes) > 0  # without replay the policies would route differently
    assert t.train_step(samples)["moe/route_mismatch_frac"] == 0.0


def test_without_replay_the_trainer_measures_route_disagreement():
    path = resolve_model_path("tiny-moe")
    samples = rollout_samples(path)
    t = trainer(path, "none", lr=0.5)
    assert t.train_step(samples)["moe/route_mismatch_frac"] < 0.01  # same weights, both float32 on the CPU
    assert t.train_step(samples)["moe/route_mismatch_frac"] > 0.0  # after a large update they disagree


def test_missing_or_corrupted_routes_raise_naming_the_sample():
    path = resolve_model_path("tiny-moe")
    samples = rollout_samples(path)
    t = trainer(path, "rollout")
    bad = [samples[0], Sample(prompt_ids=samples[1].prompt_ids, response_ids=samples[1].response_ids,
                              routed_experts=samples[1].routed_experts[:-1], advantage=1.0)]  # fmt: skip
    with pytest.raises(ValueError, match="sample 1: routed_experts has shape"):
        t.train_step(bad)
    with pytest.raises(ValueError, match="carry no routed_experts"):
        t.train_step([Sample(prompt_ids=[1, 2], response_ids=[3], advantage=1.0)])
    with pytest.raises(ValueError, match="routing_replay"):
        MoEConfig(routing_replay="sometimes")


def test_train_mode_replays_the_routes_of_a_no_grad_pass():
    """routing_replay=train: the gradient pass routes as the no-grad pass did (here checked through the
    model's own capture: replaying the captured routes reproduces them), and training proceeds normally."""
    path = resolve_model_path("tiny-moe")
    samples = rollout_samples(path)
    t = trainer(path, "train")
    mb = build_microbatch(samples, list(range(len(samples))), "cpu")
    with torch.no_grad():
        routes = t.model.run(ForwardBatch.packed(mb.input_ids_T, mb.lengths, capture_experts=True)).routed_experts_TLK
    logprobs_T, _, out = t._forward_logprobs(t.model, mb, train=True)
    assert torch.equal(out.routed_experts_TLK.long(), routes.long())
    assert logprobs_T.requires_grad
    metrics = t.train_step(samples)
    assert metrics["moe/route_mismatch_frac"] < 0.01  # the rollout's routes (same weights) were not replayed


def test_minibatch_updates_replay_the_rollout_routes_in_every_pass():
    """Three mini-batches x two epochs: the policy moves between updates, so without replay its routes drift from
    the engine's within the step; with replay every pass routes as the engine did."""
    path = resolve_model_path("tiny-moe")
    samples = rollout_samples(path)
    metrics = {}
    for replay in ("none", "rollout"):
        cfg = TrainerConfig(
            loss=LossConfig(policy_loss="ppo"),
            optim=OptimConfig(lr=0.5),
            moe=MoEConfig(routing_replay=replay),
            num_minibatches=3,
            epochs=2,
        )
        metrics[replay] = Trainer(path, cfg).train_step(samples)
    assert metrics["none"]["moe/route_mismatch_frac"] > 0.0
    assert metrics["rollout"]["moe/route_mismatch_frac"] == 0.0
    assert metrics["rollout"]["policy/ratio_max"] > 1.0  # the updates did move the policy
