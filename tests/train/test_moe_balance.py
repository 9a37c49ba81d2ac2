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
