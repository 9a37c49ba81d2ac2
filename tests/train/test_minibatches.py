"""Mini-batch updates and Dr.GRPO through the Trainer: several optimizer steps per rollout batch make the
PPO clip act (and the policy losses differ), the old policy is fixed before the first update, and the
`constant` aggregation divides by num_seqs x the generation budget."""

import pytest
import torch

from leagues.model import load_pretrained, resolve_model_path
from leagues.train.losses import LossConfig
from leagues.train.optim import OptimConfig
from leagues.train.trainer import Trainer, TrainerConfig

from .test_trainer import grads_after_backward, make_samples


def trainer(**cfg) -> Trainer:
    loss = cfg.pop("loss", LossConfig())
    optim = OptimConfig(lr=cfg.pop("lr", 3e-2), warmup_steps=0, grad_clip=cfg.pop("grad_clip", 1.0))
    return Trainer(load_pretrained(resolve_model_path("tiny-moe")), TrainerConfig(loss=loss, optim=optim, **cfg))


def test_one_update_keeps_the_ratio_at_one():
    metrics = trainer().train_step(make_samples(8))
    assert metrics["policy/clip_frac"] == 0.0 and metrics["policy/ratio_max"] == pytest.approx(1.0)


def test_minibatch_updates_make_the_clip_act():
    t = trainer(num_minibatches=4)
    metrics = t.train_step(make_samples(16))
    assert t.step == 1 and t.scheduler.last_epoch == 4  # one rollout batch, four optimizer updates
    assert metrics["policy/clip_frac"] > 0 and metrics["policy/ratio_max"] > 1.0


@pytest.mark.parametrize("old_logprobs", ["recompute", "rollout"])
def test_policy_losses_differ_once_the_ratio_moves(old_logprobs):
    weights = {}
    for policy_loss in ("ppo", "gspo", "cispo"):
        t = trainer(num_minibatches=2, epochs=2, old_logprobs=old_logprobs, loss=LossConfig(policy_loss=policy_loss))
        t.train_step(make_samples(12))
        weights[policy_loss] = torch.cat([p.detach().flatten() for p in t.model.parameters()])
    for a, b in (("ppo", "gspo"), ("ppo", "cispo"), ("gspo", "cispo")):
        assert not torch.allclose(weights[a], weights[b], rtol=0, atol=1e-6), (a, b)


def test_epochs_pass_over_the_batch_again_and_count_its_tokens_once():
    samples = make_samples(8)
    once, twice = trainer(num_minibatches=2), trainer(num_minibatches=2, epochs=2)
    m1, m2 = once.train_step(samples), twice.train_step(samples)
    assert twice.scheduler.last_epoch == 2 * once.scheduler.last_epoch == 4
    assert m1["tokens"] == m2["tokens"]


def test_dr_grpo_constant_divides_by_the_generation_budget():
    samples = make_samples(6)
    budget = 40
    mask_tokens = sum(len(s.response_ids) for s in samples)
    unclipped = dict(lr=0.0, grad_clip=0.0)  # the gradients as the loss makes them
    constant = trainer(**unclipped, loss=LossConfig(aggregation="constant", max_response_tokens=budget))
    token_mean = trainer(**unclipped, loss=LossConfig(aggregation="token_mean"))
    g_constant, g_mean = grads_after_backward(constant, samples), grads_after_backward(token_mean, samples)
    # token_mean divides the token sum by the masked tokens, constant by num_seqs x budget
    scale = mask_tokens / (len(samples) * budget)
    for name, grad in g_mean.items():
        torch.testing.assert_close(g_constant[name], grad * scale, rtol=1e-4, atol=1e-7)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="max_response_tokens"):
        trainer(loss=LossConfig(aggregation="constant"))
    with pytest.raises(ValueError, match="trainer.num_minibatches"):
        TrainerConfig(num_minibatches=0)
    with pytest.raises(ValueError, match="trainer.old_logprobs"):
        TrainerConfig(old_logprobs="engine")


def test_kl_reference_from_a_model_object_starts_equal_to_the_policy():
    t = trainer(lr=0.0, loss=LossConfig(kl_coef=0.1))
    samples = make_samples(4)
    ref = t._ref_logprobs(samples)
    for got, want in zip(ref, t.compute_logprobs(samples), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert t.train_step(samples)["kl/mean"] == pytest.approx(0.0, abs=1e-6)
