"""PPO's critic and on-policy distillation's teacher on one GPU, with no process group: the trainer keeps the
policy and the critic on the device in float32, and the teacher on the CPU between uses (`trainer.ref_offload`).

- a critic beside the policy steps on a fixed batch with values and returns: finite losses, and the critic's value
  loss falls over a few steps;
- the teacher's logprobs through the trainer equal the teacher model's own, computed directly from its logits.
"""

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from leagues.model import load_pretrained, resolve_model_path, save_pretrained
from leagues.train.critic import CriticConfig
from leagues.train.optim import OptimConfig
from leagues.train.trainer import Trainer, TrainerConfig
from leagues.types import Sample
from tests.train.test_critic import value_targets
from tests.train.test_trainer import make_samples

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def critic_history(steps: int) -> tuple[Trainer, list[dict[str, float]]]:
    """A trainer of the tiny model with a critic, and its metrics over `steps` steps on one fixed batch (the
    critic's values of the batch recomputed before each step, as the loop does once per rollout batch)."""
    cfg = TrainerConfig(optim=OptimConfig(lr=1e-3), compile=False)  # eager: compiled steps have their own tests
    critic = CriticConfig(optim=OptimConfig(lr=5e-3, schedule="cosine", total_steps=steps, min_lr_ratio=0.1))
    trainer = Trainer("tiny-moe", cfg, critic=critic)
    samples = make_samples(8, seed=1)
    return trainer, [trainer.train_step(value_targets(trainer, samples)) for _ in range(steps)]


def direct_logprobs(model, samples: list[Sample], temperature: float) -> list[torch.Tensor]:
    """Each sample's response-token logprobs from the model's own logits, one sequence at a time, with no trainer:
    position t's logits score token t + 1."""
    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor(sample.prompt_ids + sample.response_ids, device=device)
            logprobs_TV = (model(ids[None, :-1])[0].float() / temperature).log_softmax(-1)
            targets_T = ids[len(sample.prompt_ids) :]
            scored_TV = logprobs_TV[len(sample.prompt_ids) - 1 :]
            out.append(scored_TV.gather(-1, targets_T[:, None]).squeeze(-1).cpu())
    return out


def teacher_checkpoint(root: Path) -> Path:
    """A tiny checkpoint other than the student's (its own weights, the student's tokenizer)."""
    path = root / "teacher"
    shutil.copytree(resolve_model_path("tiny-moe"), path)
    model = load_pretrained(path)
    model.init_weights(seed=7, std=0.1)
    save_pretrained(model, path)
    return path


def test_gpu_critic_steps_beside_the_policy_and_its_value_loss_falls():
    trainer, history = critic_history(steps=8)
    assert not dist.is_initialized() and trainer.mesh is None  # one device, no process group
    assert all(p.is_cuda for p in trainer.model.parameters())
    assert all(p.is_cuda for p in trainer.critic.model.parameters())
    for metrics in history:
        for key in ("loss", "grad_norm", "critic/value_loss", "critic/grad_norm", "critic/explained_variance"):
            assert math.isfinite(metrics[key]), (key, metrics)
    losses = [m["critic/value_loss"] for m in history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert history[-1]["critic/explained_variance"] > history[0]["critic/explained_variance"]


def test_gpu_teacher_logprobs_are_the_teacher_models_own(tmp_path):
    path = teacher_checkpoint(tmp_path)
    trainer = Trainer("tiny-moe", TrainerConfig(compile=False), temperature=0.7, teacher=path)
    samples = make_samples(6, seed=2)
    got = trainer.teacher_logprobs(samples)
    assert all(p.device.type == "cpu" for p in trainer.teacher.parameters())  # offloaded again after scoring
    want = direct_logprobs(load_pretrained(path, dtype=torch.float32, device="cuda"), samples, temperature=0.7)
    for sample, a, b in zip(samples, got, want, strict=True):
        assert a.shape == (len(sample.response_ids),)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    student = trainer.compute_logprobs(samples)
    assert not torch.allclose(student[0], got[0], atol=1e-2)  # the teacher is another model
