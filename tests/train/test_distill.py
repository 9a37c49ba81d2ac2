"""On-policy distillation: the per-token reverse KL advantages against hand computation, the teacher's vocabulary
check, the trainer's teacher logprobs (at the rollout temperature, with the teacher's own routes under routing
replay), and a deterministic, replaying student distilled through the Trainer from an engine's samples."""

import json
import shutil

import pytest
import torch

from leagues.engine import Engine, SamplingParams
from leagues.model import load_pretrained, resolve_model_path, save_pretrained
from leagues.train import AdvantageConfig, AdvantageInputs, OptimConfig, Trainer, TrainerConfig, compute_advantages
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


def test_a_deterministic_replaying_student_distills_on_policy_through_the_trainer(tmp_path):
    """R3 and deterministic mode for the student, through the Trainer: a deterministic engine samples with its
    routes recorded; the student (deterministic, `routing_replay` rollout, with a teacher) computes the engine's
    logprobs bit for bit by replaying them; the teacher, another checkpoint, scores with its own routes and
    batch-invariant kernels (the same bits alone and in the batch, and as a deterministic trainer of the teacher
    alone). A train step on the distillation advantages sees no mismatch with the rollout and moves each sampled
    token's logprob towards the teacher's (its squared gap, which the reverse-KL advantage descends, falls)."""
    teacher_model = load_pretrained(resolve_model_path("tiny-moe"))
    teacher_model.init_weights(seed=5, std=0.1)
    save_pretrained(teacher_model, tmp_path / "teacher")
    path = resolve_model_path("tiny-moe")
    engine = Engine(path, num_blocks=128, block_size=4, device="cpu", dtype="float32", deterministic=True)
    try:
        params = [
            SamplingParams(temperature=1.0, seed=i, max_new_tokens=6, ignore_eos=True, return_routed_experts=True)
            for i in range(4)
        ]
        prompts = [[5, 17, 33, 42, 8], [9, 9, 12], [70, 3, 3, 21, 40], [11]]
        outs = engine.generate(prompts, params)
    finally:
        engine.close()
    samples = [
        Sample(prompt_ids=p, response_ids=o.token_ids, rollout_logprobs=o.logprobs, routed_experts=o.routed_experts)
        for p, o in zip(prompts, outs, strict=True)
    ]
    cfg = TrainerConfig(optim=OptimConfig(lr=1e-3), moe=MoEConfig(routing_replay="rollout"))
    student = Trainer(path, cfg, deterministic=True, teacher=tmp_path / "teacher")
    for got, out in zip(student.compute_logprobs(samples), outs, strict=True):
        assert torch.equal(got, torch.tensor(out.logprobs, dtype=torch.float32))
    teacher = student.teacher_logprobs(samples)
    alone = Trainer(tmp_path / "teacher", TrainerConfig(), deterministic=True)
    for got, want in zip(teacher, alone.compute_logprobs(samples), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(student.teacher_logprobs(samples[:1])[0], teacher[0])  # batch-invariant

    def squared_gap() -> float:
        now = student.compute_logprobs(samples)
        return sum(float((s - t).square().sum()) for s, t in zip(now, teacher, strict=True))

    before = squared_gap()
    total, count = add_distill_advantages(samples, teacher, coef=1.0)
    assert total != 0.0 and count == sum(len(s.response_ids) for s in samples)
    metrics = student.train_step(samples)
    assert metrics["mismatch/abs_diff_max"] == 0.0 and metrics["moe/route_mismatch_frac"] == 0.0
    assert squared_gap() < before
