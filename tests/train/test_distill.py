"""On-policy distillation: the per-token reverse KL advantages against hand computation, the teacher's vocabulary
check, and the trainer's teacher logprobs (at the rollout temperature, with the teacher's own routes under routing
replay)."""

import json
import shutil

import pytest
import torch

from leagues.model import load_pretrained, resolve_model_path
from leagues.train import AdvantageConfig, AdvantageInputs, Trainer, TrainerConfig, compute_advantages
from leagues.train.distill import DistillConfig, add_distill_advantages, check_teacher, distill_advantages
from leagues.train.moe import MoEConfig
from leagues.types import Sample


def test_reverse_kl_advantages_by_hand():
    student_T = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    teacher_T = torch.tensor([-1.5, -1.0, -0.5, -0.25])
    mask_T = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last token is a tool output: not the student's
    advantages_T, kl_T = distill_advantages(student_T, teacher_T, mask_T, coef=0.5)
    # log pi_s - log pi_t per sampled token: 0.5, -1.0, 0.0; none off the mask
    assert kl_T.tolist() == [0.5, -1.0, 0.0, 0.0]
    assert advantages_T.tolist() == [-0.25, 0.5, 0.0, 0.0]  # tokens the teacher likes more gain


def test_the_term_is_added_to_outcome_and_to_token_advantages():
    outcome = Sample(prompt_ids=[1], response_ids=[5, 6], rollout_logprobs=[-1.0, -2.0], advantage=0.75)
    token = Sample(prompt_ids=[1], response_ids=[5, 6, 7], rollout_logprobs=[-0.5, -0.5, -0.5], loss_mask=[1, 0, 1])
    token.token_advantages = [0.1, 0.2, 0.3]
    teacher = [torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -4.0, -0.5])]
    total, count = add_distill_advantages([outcome, token], teacher, coef=2.0)
    # outcome: kl (1.0, -1.0) -> 0.75 - 2 x kl; token: kl (1.0, masked, 0.0) -> its own advantages - 2 x kl
    assert outcome.token_advantages == pytest.approx([0.75 - 2.0, 0.75 + 2.0])
    assert token.token_advantages == pytest.approx([0.1 - 2.0, 0.2, 0.3])
    assert (total, count) == (1.0 - 1.0 + 1.0 + 0.0, 4.0)


def test_a_sample_without_rollout_logprobs_is_refused():
    with pytest.raises(ValueError, match="no rollout logprobs"):
        add_distill_advantages([Sample(prompt_ids=[1], response_ids=[5])], [torch.zeros(1)], coef=1.0)


def test_the_distill_estimator_gives_the_task_no_advantage():
    inputs = AdvantageInputs(rewards_N=torch.tensor([1.0, 0.0, 1.0]), group_ids_N=torch.tensor([0, 0, 1]))
    advantages, returns = compute_advantages(inputs, AdvantageConfig(estimator="distill"))
    assert advantages.tolist() == [0.0, 0.0, 0.0] and returns is None


def test_distill_config_checks_its_coef():
    with pytest.raises(ValueError, match="distill.coef: must be >= 0"):
        DistillConfig(teacher="tiny-moe", coef=-1.0)


@pytest.fixture
def tiny_copy(tmp_path):
    path = tmp_path / "teacher"
    shutil.copytree(resolve_model_path("tiny-moe"), path)
    return path


def edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_a_teacher_with_the_students_tokenizer_passes(tiny_copy):
    assert check_teacher(tiny_copy, "tiny-moe") == tiny_copy
    edit_json(tiny_copy / "config.json", lambda c: c.update(vocab_size=128))  # a padded LM head is fine
    assert check_teacher(tiny_copy, "tiny-moe") == tiny_copy


def swap_two_tokens(tokenizer: dict) -> None:
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: swap_two_tokens(d), r"its tokenizer differs from the student's .*\('a', "),
        (None, "the teacher's LM head has 64 ids, fewer than the tokenizer's 101"),
    ],
)
def test_a_teacher_with_another_vocabulary_is_refused(tiny_copy, edit, message):
    if edit is None:
        edit_json(tiny_copy / "config.json", lambda c: c.update(vocab_size=64))
    else:
        edit_json(tiny_copy / "tokenizer.json", edit)
    with pytest.raises(ValueError, match=message):
        check_teacher(tiny_copy, "tiny-moe")


def test_a_missing_teacher_is_named(tmp_path):
    with pytest.raises(ValueError, match="distill.teacher: model .*nowhere"):
        check_teacher(tmp_path / "nowhere", "tiny-moe")


def samples_with_garbage_routes(trainer: Trainer) -> list[Sample]:
    """Samples with recorded routes that are no model's (experts 0 and 1 for every token and layer)."""
    out = []
    for prompt, response in (([5, 17, 33], [40, 41, 42, 9]), ([9, 12], [70, 3])):
        out.append(Sample(prompt_ids=prompt, response_ids=response, rollout_logprobs=[0.0] * len(response)))
    for sample in out:
        route = torch.tensor([0, 1], dtype=torch.uint8)
        sample.routed_experts = route.expand(sample.num_tokens - 1, trainer.model.config.num_moe_layers, -1).clone()
    return out


def test_teacher_logprobs_are_the_teachers_at_the_rollout_temperature_with_its_own_routes(tiny_copy):
    """A replaying student (a model object) with a teacher from a checkpoint: the teacher's logprobs are those of a
    trainer of the teacher alone, at the same temperature, whatever routes the rollout recorded (the student's)."""
    student = load_pretrained(resolve_model_path("tiny-moe"), dtype=torch.float32, device="cpu")
    replaying = TrainerConfig(moe=MoEConfig(routing_replay="rollout"))
    trainer = Trainer(student, replaying, temperature=0.7, teacher=tiny_copy)
    samples = samples_with_garbage_routes(trainer)
    expected = Trainer(tiny_copy, TrainerConfig(), temperature=0.7).compute_logprobs(samples)
    got = trainer.teacher_logprobs(samples)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    replayed = Trainer(tiny_copy, replaying, temperature=0.7).compute_logprobs(samples)
    assert not torch.allclose(replayed[0], expected[0])  # the routes would have changed them
    hotter = Trainer(tiny_copy, TrainerConfig(), temperature=1.0).compute_logprobs(samples)
    assert not torch.allclose(hotter[0], got[0])
    with pytest.raises(ValueError, match="no teacher"):
        Trainer(student, TrainerConfig()).teacher_logprobs(samples)
