"""KL to a frozen reference and the entropy bonus, through the Trainer, against values computed by hand from full
forwards: the KL as a loss term (reference loaded from a path, or copied from a model object before training)
and as reward shaping (`Trainer.kl_rewards`, the RL loop's `advantage.kl_in_reward`)."""

import pytest
import torch

from leagues.model import load_pretrained, resolve_model_path
from leagues.train.losses import LossConfig
from leagues.train.optim import OptimConfig
from leagues.train.trainer import Trainer, TrainerConfig

from .test_trainer import make_samples


def build(source: str, kl_in_reward: bool = False, lr: float = 3e-2, **loss) -> Trainer:
    model = "tiny-moe" if source == "path" else load_pretrained(resolve_model_path("tiny-moe"))
    cfg = TrainerConfig(loss=LossConfig(**loss), optim=OptimConfig(lr=lr, warmup_steps=0))
    return Trainer(model, cfg, kl_in_reward=kl_in_reward)


def full_forward(model, sample) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs of the response tokens and the entropy of the distributions they were drawn from, from one
    unpacked forward of prompt + response."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logp_TV = torch.log_softmax(model(ids)[0].float(), dim=-1)[len(sample.prompt_ids) - 1 : -1]
    logprobs_T = logp_TV.gather(1, ids[0, len(sample.prompt_ids) :, None])[:, 0]
    entropy_T = -(logp_TV.exp() * logp_TV).sum(-1)
    return logprobs_T, entropy_T


def original_model():
    return load_pretrained(resolve_model_path("tiny-moe"), dtype=torch.float32, device="cpu")


def zero_advantages(samples):
    for s in samples:
        s.advantage = 0.0  # the policy term vanishes: the loss is the regulariser alone
    return samples


@pytest.mark.parametrize("source", ["path", "object"])
def test_kl_loss_term_against_hand_computation(source):
    t = build(source, kl_coef=0.5, kl_estimator="k3")
    samples = make_samples(8)
    t.train_step(make_samples(8, seed=1))  # the policy moves away from the reference; the reference stays
    ref_model = original_model()
    kl = []
    for s in samples:
        logp_T, _ = full_forward(t.model, s)
        ref_T, _ = full_forward(ref_model, s)
        kl.append((ref_T - logp_T).exp() - (ref_T - logp_T) - 1)
    kl_mean = float(torch.cat(kl).mean())
    assert kl_mean > 1e-4  # the step moved the policy: the check below is not 0 == 0
    metrics = t.train_step(zero_advantages(samples))
    assert metrics["kl/mean"] == pytest.approx(kl_mean, rel=1e-4)
    assert metrics["loss"] == pytest.approx(0.5 * kl_mean, rel=1e-4)  # token_mean of kl_coef x KL


@pytest.mark.parametrize("source", ["path", "object"])
def test_kl_in_reward_shapes_rewards_instead_of_the_loss(source):
    t = build(source, kl_in_reward=True, kl_coef=0.3, kl_estimator="k1")
    metrics = t.train_step(make_samples(8, seed=1))
    assert "kl/mean" not in metrics  # no KL term in the loss
    samples = make_samples(6)
    samples[0].loss_mask = [0] * len(samples[0].response_ids)  # a masked sample is not penalised
    got = t.kl_rewards(samples)
    ref_model = original_model()
    for s, penalty in zip(samples, got, strict=True):
        logp_T, _ = full_forward(t.model, s)
        ref_T, _ = full_forward(ref_model, s)
        mask_T = torch.tensor(s.loss_mask or [1] * len(s.response_ids), dtype=torch.float32)
        assert penalty == pytest.approx(float(-0.3 * ((logp_T - ref_T) * mask_T).sum()), rel=1e-4, abs=1e-6)
    assert got[0] == 0.0 and any(abs(p) > 1e-4 for p in got)


def test_kl_rewards_need_a_reference():
    with pytest.raises(ValueError, match="kl_coef"):
        build("object").kl_rewards(make_samples(2))


def test_entropy_bonus_against_hand_computation_and_it_raises_the_entropy():
    t = build("object", lr=1e-3, entropy_coef=0.1)  # small steps: the tiny model starts near the maximum entropy
    samples = zero_advantages(make_samples(8))
    entropy = torch.cat([full_forward(t.model, s)[1] for s in samples])
    first = t.train_step(samples)
    assert first["entropy/mean"] == pytest.approx(float(entropy.mean()), rel=1e-4)
    assert first["loss"] == pytest.approx(-0.1 * float(entropy.mean()), rel=1e-4)
    after = t.train_step(samples)
    assert after["entropy/mean"] > first["entropy/mean"]  # the bonus is all the gradient there is
