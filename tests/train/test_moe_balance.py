"""Expert load balance: the Switch auxiliary loss and router z-loss against hand-computed values, load
metrics, and the balance loss flattening a skewed router when it is the only objective."""

import math

import pytest
import torch

from leagues.train import LossConfig, OptimConfig, Trainer, TrainerConfig
from leagues.train.moe import MoEConfig, expert_counts, load_balance_loss, load_metrics, router_z_loss
from leagues.types import Sample


def test_aux_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # probs: [.5, .5] and [.75, .25]
    ids = torch.tensor([[0], [0]])  # both tokens to expert 0 (top-1)
    # f = [1, 0], P = [(.5 + .75) / 2, (.5 + .25) / 2] = [.625, .375]; E * sum f*P = 2 * .625
    assert load_balance_loss(logits, ids).item() == pytest.approx(1.25)
    balanced = load_balance_loss(torch.zeros(4, 2), torch.tensor([[0], [1], [0], [1]]))
    assert balanced.item() == pytest.approx(1.0)  # perfect balance gives 1


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    want = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(want)


def test_load_metrics_by_hand():
    ids = torch.tensor([[[0], [1]], [[0], [1]], [[0], [2]], [[0], [3]]])  # [T=4, L=2, K=1], 4 experts
    counts = expert_counts(ids, 4)
    assert counts.tolist() == [[4, 0, 0, 0], [0, 2, 1, 1]]
    m = load_metrics(counts)
    assert m["moe/load_max_over_mean/layer0"] == pytest.approx(4.0)
    assert m["moe/load_max_over_mean/layer1"] == pytest.approx(2.0)
    assert m["moe/experts_without_tokens"] == pytest.approx((3 + 1) / 2)
    entropy1 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(4)
    assert m["moe/load_entropy"] == pytest.approx((0.0 + entropy1) / 2)


def test_balance_loss_alone_trains_the_router():
    """With a zero policy gradient (advantage 0), the balance terms are the whole objective: the auxiliary
    loss falls over the steps, and without them the router does not move at all."""
    gen = torch.Generator().manual_seed(0)
    samples = [
        Sample(prompt_ids=torch.randint(4, 100, (12,), generator=gen).tolist(), response_ids=[7, 8, 9], advantage=0.0)
        for _ in range(16)
    ]

    def run(aux: float) -> tuple[list[float], torch.Tensor, torch.Tensor]:
        optim = OptimConfig(lr=1e-2, weight_decay=0.0)
        cfg = TrainerConfig(loss=LossConfig(policy_loss="reinforce"), optim=optim, moe=MoEConfig(aux_loss_coef=aux))
        trainer = Trainer("tiny-moe", cfg)
        before = trainer.model.layers[0].moe.router.weight.detach().clone()
        history = [trainer.train_step(samples).get("moe/aux_loss", float("nan")) for _ in range(30)]
        return history, before, trainer.model.layers[0].moe.router.weight.detach()

    history, before, after = run(aux=1.0)
    assert sum(history[-5:]) / 5 < history[0]
    assert not torch.equal(before, after)
    _, before, after = run(aux=0.0)
    assert torch.equal(before, after)


def skewed_trainer(rate: float) -> Trainer:
    cfg = TrainerConfig(
        loss=LossConfig(policy_loss="reinforce"),
        optim=OptimConfig(lr=0.0),
        moe=MoEConfig(bias_update_rate=rate),
    )
    trainer = Trainer("tiny-moe", cfg)
    for _, bias in trainer._expert_biases():
        bias[0] = 1.0  # every token now picks expert 0: a skewed router
    return trainer


def balance_samples() -> list[Sample]:
    gen = torch.Generator().manual_seed(1)
    return [
        Sample(prompt_ids=torch.randint(4, 100, (12,), generator=gen).tolist(), response_ids=[7, 8, 9], advantage=0.0)
        for _ in range(16)
    ]


def test_bias_update_moves_load_toward_uniform_and_reaches_the_engine(tmp_path):
    from leagues.engine import Engine, SamplingParams
    from leagues.model import ForwardBatch, resolve_model_path
    from leagues.sync import push_in_place

    trainer, samples = skewed_trainer(rate=0.02), balance_samples()
    first = trainer.train_step(samples)
    for _ in range(40):
        last = trainer.train_step(samples)
    assert first["moe/load_max_over_mean"] > 2.5  # skewed
    assert last["moe/load_max_over_mean"] < 0.6 * first["moe/load_max_over_mean"]
    assert last["moe/load_entropy"] > first["moe/load_entropy"]
    # the engine routes with the same biases after a sync
    engine = Engine(resolve_model_path("tiny-moe"), num_blocks=64, device="cpu", dtype="float32")
    try:
        push_in_place(trainer.state_dict_for_sync(), engine, version=1)
        params = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True, return_routed_experts=True)
        out = engine.generate([[5, 17, 33, 42]], params)[0]
    finally:
        engine.close()
    ids = torch.tensor([5, 17, 33, 42, *out.token_ids[:-1]])
    with torch.no_grad():
        mine = trainer.model.run(ForwardBatch.packed(ids, [len(ids)], capture_experts=True)).routed_experts_TLK
    assert torch.equal(mine.long().sort(-1).values, out.routed_experts.long().sort(-1).values)
    # and a checkpoint keeps them
    saved = {n: b.clone() for n, b in trainer._expert_biases()}
    path = trainer.save(tmp_path / "ckpt")
    fresh = skewed_trainer(rate=0.02)
    fresh.load(path)
    for name, bias in fresh._expert_biases():
        assert torch.equal(bias, saved[name])
