"""On-policy distillation: a frozen teacher scores the student's own samples, token by token.

Sits beside the KL reference inside the `Trainer` (`Trainer(..., teacher=PATH)`), between advantages and the
train step in the loop:

    trainer.teacher_logprobs(samples)     once per rollout batch: the teacher's logprob of each sampled token
    distill_advantages(...)               per token: -coef x (student logprob - teacher logprob)
    add_distill_advantages(samples, ...)  added to the task's advantages (or alone: `advantage.estimator distill`)

Decisions:
- The signal is the per-token reverse KL estimate log pi_student(y_t) - log pi_teacher(y_t) on tokens the student
  sampled (Agarwal et al. 2024, GKD; Gu et al. 2024, MiniLLM; Thinking Machines 2025, "On-Policy Distillation"),
  used as a negative advantage: the policy loss then lowers the reverse KL, token by token, with the run's own
  clipping and off-policy corrections. It is dense (every sampled token is scored), needs one teacher forward per
  rollout batch and no backward through the teacher, and needs no reward: `advantage.estimator distill` gives
  the task's advantage 0, so the teacher is the whole signal. With another estimator the term is added to its
  advantages (an outcome advantage broadcast to every token, or gae's per-token ones after whitening; the critic
  keeps regressing the task's returns).
- The student's logprob is the engine's (`Sample.rollout_logprobs`): the distribution that sampled the token,
  so the estimate is unbiased whatever the trainer's old policy is; in deterministic mode it equals the
  trainer's bit for bit. The teacher's is computed at the rollout temperature, as the reference's is.
- The teacher is any supported family that shares the student's tokenizer: the same token-to-id map, and LM
  heads that cover it (a teacher may pad its vocabulary differently, as Qwen2.5 sizes do). `check_teacher` says
  so before anything is built or trained. It is built and sharded like the reference (FSDP2 and expert parallel
  on the policy's mesh, sharded load), never steps and is never checkpointed, and runs its own routes: routing
  replay replays the student's routes on the student only.
- `train/distill/reverse_kl` is the token mean of the estimate over the global batch's loss tokens.

Legend: T response tokens of one sample.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from leagues.model import load_tokenizer, read_config, resolve_model_path
from leagues.train.packing import response_mask
from leagues.types import Sample


@dataclass(kw_only=True, slots=True)
class DistillConfig:
    teacher: str = ""
    """Checkpoint directory or built-in model name of the teacher (any supported family; the student's tokenizer).
    Empty: no distillation."""
    coef: float = 1.0
    """Weight of the per-token reverse KL estimate in the advantages: each sampled token's advantage gets
    -coef x (student logprob - teacher logprob)."""

    def __post_init__(self) -> None:
        if self.coef < 0:
            raise ValueError(f"distill.coef: must be >= 0, got {self.coef}")

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)


def check_teacher(teacher: str | Path, student: str | Path) -> Path:
    """The teacher's checkpoint directory, once it is known to share the student's vocabulary: the same tokenizer
    (token-to-id map) when both have one, else the same vocabulary size, and LM heads covering every token id.
    A mismatch raises `ValueError` saying which."""
    try:
        teacher_path = resolve_model_path(teacher)
    except FileNotFoundError as error:
        raise ValueError(f"distill.teacher: {error}") from None
    student_path = resolve_model_path(student)
    paths = {"teacher": teacher_path, "student": student_path}
    sizes = {name: read_config(path).vocab_size for name, path in paths.items()}
    have_tokenizers = all((p / "tokenizer.json").is_file() for p in paths.values())
    if not have_tokenizers:
        if sizes["teacher"] != sizes["student"]:
            raise ValueError(
                f"distill.teacher {teacher}: vocabulary of {sizes['teacher']} ids, the student's {sizes['student']} "
                "(and no tokenizer.json to compare): the teacher must share the student's tokenizer"
            )
        return teacher_path
    vocab_t, vocab_s = (load_tokenizer(p).get_vocab() for p in (teacher_path, student_path))
    if vocab_t != vocab_s:
        differ = sorted(set(vocab_t.items()) ^ set(vocab_s.items()), key=lambda kv: kv[1])[:3]
        raise ValueError(
            f"distill.teacher {teacher}: its tokenizer differs from the student's ({len(vocab_t)} against "
            f"{len(vocab_s)} tokens; first differences (token, id): {differ}): the teacher must share the student's "
            "tokenizer"
        )
    ids = max(vocab_s.values()) + 1
    for name, size in sizes.items():
        if size < ids:
            raise ValueError(
                f"distill.teacher {teacher}: the {name}'s LM head has {size} ids, fewer than the tokenizer's {ids}"
            )
    return teacher_path


def distill_advantages(student_T: Tensor, teacher_T: Tensor, mask_T: Tensor, coef: float) -> tuple[Tensor, Tensor]:
    """(advantages_T, reverse_kl_T): the per-token reverse KL estimate student - teacher on the loss tokens (0
    elsewhere), and -coef times it."""
    kl_T = torch.where(mask_T > 0, student_T.float() - teacher_T.float(), 0.0)
    return -coef * kl_T, kl_T


def add_distill_advantages(samples: list[Sample], teacher: list[Tensor], coef: float) -> tuple[float, float]:
    """Add each sample's distillation term to its advantages, as per-token advantages (the sample's `advantage`
    on every token when it had none per token); returns (sum of the reverse KL estimate, loss tokens)."""
    total, count = 0.0, 0.0
    for sample, teacher_T in zip(samples, teacher, strict=True):
        if sample.rollout_logprobs is None:
            raise ValueError("distill: a sample has no rollout logprobs (the engine's logprob of each sampled token)")
        mask_T = torch.tensor(response_mask(sample), dtype=torch.float32)
        student_T = torch.tensor(sample.rollout_logprobs, dtype=torch.float32)
        advantages_T, kl_T = distill_advantages(student_T, teacher_T, mask_T, coef)
        task = sample.token_advantages or [sample.advantage] * len(sample.response_ids)
        sample.token_advantages = (torch.tensor(task, dtype=torch.float32) + advantages_T).tolist()
        total, count = total + float(kl_T.sum()), count + float(mask_T.sum())
    return total, count
