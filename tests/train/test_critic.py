"""PPO's critic (`leagues.train.critic`) through the Trainer: the clipped value loss by hand, values at the
logprobs' positions, a critic that learns a fixed batch, the warm-up, `critic.model`, and a bitwise resume of
policy and critic. 2 gloo ranks against one process: `test_trainer_distributed.py`."""

import pytest
import torch

from leagues.model import ForwardBatch, load_pretrained, resolve_model_path, save_pretrained
from leagues.train.critic import CriticConfig, value_loss
from leagues.train.losses import Normalizer
from leagues.train.optim import OptimConfig
from leagues.train.trainer import Trainer, TrainerConfig
from leagues.types import Sample

from .test_trainer import make_samples


def critic_trainer(warmup_steps: int = 0, **critic) -> Trainer:
    cfg = TrainerConfig(optim=OptimConfig(lr=1e-3, schedule="cosine", total_steps=10))
    optim = OptimConfig(lr=5e-3, schedule="cosine", total_steps=10, min_lr_ratio=0.1)
    return Trainer("tiny-moe", cfg, critic=CriticConfig(optim=optim, warmup_steps=warmup_steps, **critic))


def value_targets(trainer: Trainer, samples: list[Sample]) -> list[Sample]:
    """What the loop gives a step: the critic's values of the batch (computed once, before the update), and fixed
    returns and per-token advantages (here a function of the sample, as if from GAE)."""
    for i, (sample, values) in enumerate(zip(samples, trainer.compute_values(samples), strict=True)):
        sample.values = values.tolist()
        sample.returns = [float(i % 2)] * len(sample.response_ids)
        sample.token_advantages = [float(i % 3) - 1.0] * len(sample.response_ids)
    return samples


def test_clipped_value_loss_by_hand():
    """clip 0.2 around the old values 0.5: token 0 (V 1, R 0) counts its plain error 1/2 (larger than the clipped
    one's, .7^2 / 2), token 1 (V 1.2, R 1) its clipped one (.7 - 1)^2 / 2 = .045 (no gradient: the clip holds
    it), token 2 is off the mask; the sum is divided by the global batch's 4 tokens."""
    values_T = torch.tensor([1.0, 1.2, 2.0], requires_grad=True)
    old_T, returns_T, mask_T = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 1, 0])
    norm = Normalizer(num_tokens=4.0, num_seqs=1.0)
    loss, metrics = value_loss(values_T, old_T, returns_T, mask_T, 0.2, norm)
    assert loss.item() == pytest.approx((0.5 + 0.045) / 4)
    loss.backward()
    torch.testing.assert_close(values_T.grad, torch.tensor([0.25, 0.0, 0.0]))
    assert metrics["critic/value_loss"].item() == pytest.approx((0.5 + 0.045) / 2)
    assert metrics["critic/clip_frac"].item() == 0.5 and metrics["critic/value_mean"].item() == pytest.approx(1.1)
    plain, metrics = value_loss(values_T, old_T, returns_T, mask_T, None, norm)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 0.04) / 4) and "critic/clip_frac" not in metrics


def test_values_start_at_zero_and_line_up_with_a_full_forward():
    """Packed values equal each sample's own forward at the positions that score its response tokens."""
    trainer = critic_trainer()
    samples = make_samples(5)
    for sample, values in zip(samples, trainer.compute_values(samples), strict=True):
        assert torch.equal(values, torch.zeros(len(sample.response_ids)))  # the head starts at zero
    trainer.train_step(value_targets(trainer, samples))  # the head and the trunk move
    for sample, values in zip(samples, trainer.compute_values(samples), strict=True):
        ids = torch.tensor(sample.prompt_ids + sample.response_ids[:-1])
        with torch.no_grad():
            full = trainer.critic.model.values(ForwardBatch.packed(ids, [len(ids)], compute_logits=False))
        torch.testing.assert_close(values, full[len(sample.prompt_ids) - 1 :], rtol=0, atol=1e-6)
        assert values.abs().sum() > 0


def test_the_critic_learns_a_fixed_batch_while_the_policy_waits():
    """Within `warmup_steps` only the critic trains: the value loss falls and the explained variance rises, the
    policy's weights and schedule stay as they were."""
    trainer = critic_trainer(warmup_steps=100)
    policy = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    samples = make_samples(8, seed=1)
    history = [trainer.train_step(value_targets(trainer, samples)) for _ in range(10)]
    losses = [m["critic/value_loss"] for m in history]
    assert losses[-1] < 0.1 * losses[0], losses
    assert history[0]["critic/explained_variance"] == 0.0  # every value 0: nothing explained yet
    assert history[-1]["critic/explained_variance"] > 0.8
    assert all("grad_norm" not in m and "critic/grad_norm" in m for m in history)
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, policy[name]), name
    assert trainer.scheduler.last_epoch == 0 and trainer.critic.scheduler.last_epoch == 10


def test_the_policy_moves_after_the_warm_up():
    trainer = critic_trainer(warmup_steps=1)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    first = trainer.train_step(value_targets(trainer, make_samples(4, seed=2)))
    assert "grad_norm" not in first and all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    second = trainer.train_step(value_targets(trainer, make_samples(4, seed=3)))
    assert second["grad_norm"] > 0 and not all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_critic_model_gives_the_trunk_and_the_head_starts_at_zero(tmp_path):
    other = load_pretrained(resolve_model_path("tiny-moe"))
    other.init_weights(seed=5)
    save_pretrained(other, tmp_path / "other")
    trainer = Trainer("tiny-moe", TrainerConfig(), critic=CriticConfig(model=str(tmp_path / "other")))
    critic = dict(trainer.critic.model.named_parameters())
    for name, param in other.named_parameters():
        if not name.startswith("lm_head."):
            assert torch.equal(critic[name], param), name
    assert "lm_head.weight" not in critic and not critic["value_head.weight"].any()
    with pytest.raises(ValueError, match="has no critic"):
        Trainer("tiny-moe", TrainerConfig()).compute_values(make_samples(1))
    with pytest.raises(ValueError, match="critic.value_clip: must be > 0"):
        CriticConfig(value_clip=0.0)


def test_policy_and_critic_resume_bitwise(tmp_path):
    """Step, save, step; a fresh trainer loads the save and steps: policy, critic and both optimizers end bit for
    bit equal, and the critic's schedule goes on where it was."""
    first, second = make_samples(6, seed=4), make_samples(6, seed=5)
    trainer = critic_trainer()
    trainer.train_step(value_targets(trainer, first))
    path = trainer.save(tmp_path / "ckpt", extra={"position": 3})
    trainer.train_step(value_targets(trainer, second))
    resumed = critic_trainer()
    assert resumed.load(path) == {"position": 3} and resumed.step == 1
    resumed.train_step(value_targets(resumed, second))
    for a, b in ((trainer.model, resumed.model), (trainer.critic.model, resumed.critic.model)):
        for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
            assert torch.equal(x, y), name
    for a, b in ((trainer.optimizer, resumed.optimizer), (trainer.critic.optimizer, resumed.critic.optimizer)):
        for x, y in zip(a.state.values(), b.state.values(), strict=True):
            assert all(torch.equal(x[k], y[k]) for k in x)
    assert resumed.critic.scheduler.last_epoch == trainer.critic.scheduler.last_epoch == 2
