"""The trainer on one process: split invariance, SFT, logprobs against the engine's definition."""

import json

import pytest
import torch

from leagues.model import load_pretrained, resolve_model_path
from leagues.train.losses import LossConfig
from leagues.train.moe import MoEConfig
from leagues.train.optim import OptimConfig
from leagues.train.sft import SFTConfig, run_sft
from leagues.train.trainer import Trainer, TrainerConfig
from leagues.types import Sample


def make_samples(num: int, seed: int = 0) -> list[Sample]:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(num):
        p, r = int(torch.randint(2, 9, (1,), generator=gen)), int(torch.randint(1, 7, (1,), generator=gen))
        ids = torch.randint(3, 100, (p + r,), generator=gen).tolist()
        logprobs = (-torch.rand(r, generator=gen) * 3).tolist()
        samples.append(
            Sample(
                prompt_ids=ids[:p],
                response_ids=ids[p:],
                advantage=float(i % 3) - 1.0,
                rollout_logprobs=logprobs,
                group_id=i // 4,
            )
        )
    return samples


def grads_after_backward(
    trainer: Trainer, samples: list[Sample], metrics: dict | None = None
) -> dict[str, torch.Tensor]:
    """Run a step with lr 0 and return the gradients it accumulated (before the optimizer zeroes them);
    the step's metrics go to `metrics` when given."""
    captured = {}
    original = trainer.optimizer.step

    def capture(*args, **kwargs):
        captured.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return original(*args, **kwargs)

    trainer.optimizer.step = capture
    step_metrics = trainer.train_step(samples)
    trainer.optimizer.step = original
    if metrics is not None:
        metrics.update(step_metrics)
    return captured


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_gradients_do_not_depend_on_microbatch_split(aggregation):
    samples = make_samples(12)
    total = sum(s.num_tokens - 1 for s in samples)
    results = []
    for budget in (total, total // 2 + 8, total // 4 + 8):
        cfg = TrainerConfig(
            loss=LossConfig(aggregation=aggregation, off_policy="token_tis"),
            optim=OptimConfig(lr=0.0),
            max_tokens_per_microbatch=budget,
        )
        trainer = Trainer(load_pretrained(resolve_model_path("tiny-moe")), cfg)
        results.append(grads_after_backward(trainer, samples))
    for other in results[1:]:
        for name, grad in results[0].items():
            torch.testing.assert_close(other[name], grad, rtol=0, atol=1e-6)


def test_padded_microbatches_train_as_unpadded():
    """Micro-batches run padded (as with `compile`, whose blocks see a few static sizes) give the same gradients,
    loss and MoE metrics (load, balance loss) as unpadded ones: no loss, route or metric sees the padding."""
    samples = make_samples(12)
    cfg = TrainerConfig(optim=OptimConfig(lr=0.0), moe=MoEConfig(aux_loss_coef=0.01, z_loss_coef=0.001))
    runs = []
    for pad_to in (1, 64):
        trainer = Trainer(load_pretrained(resolve_model_path("tiny-moe")), cfg)
        trainer.model.pad_to = pad_to
        metrics = {}
        grads = grads_after_backward(trainer, samples, metrics)
        runs.append((grads, metrics))
    (grads, metrics), (padded_grads, padded_metrics) = runs
    for name, grad in grads.items():
        torch.testing.assert_close(padded_grads[name], grad, rtol=0, atol=1e-6, msg=name)
    for key in ("loss", "moe/aux_loss", "moe/z_loss", "moe/load_max_over_mean", "moe/load_entropy", "tokens"):
        assert key in metrics, key
        assert padded_metrics[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_compute_logprobs_match_a_full_forward():
    samples = make_samples(5)
    trainer = Trainer("tiny-moe", TrainerConfig(), temperature=0.7)
    got = trainer.compute_logprobs(samples)
    for s, lp in zip(samples, got, strict=True):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(trainer.model(ids)[0].float() / 0.7, dim=-1)
        ref = logp[len(s.prompt_ids) - 1 : -1].gather(1, ids[0, len(s.prompt_ids) :, None])[:, 0]
        torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)


def test_sft_lowers_the_loss(tmp_path):
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(4) for b in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SFTConfig(data=str(data), epochs=6, batch_size=16, out=str(tmp_path / "out"))
    cfg.trainer.optim = OptimConfig(lr=3e-3, warmup_steps=0)
    losses = run_sft(cfg, log=lambda _: None)
    assert losses[-1] < 0.7 * losses[0]
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


def test_sft_bad_line_names_file_line_field(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'response'"):
        run_sft(SFTConfig(data=str(data)), log=lambda _: None)


def test_sft_input_errors_come_before_training_and_name_the_place(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no prompt/response pairs"):
        run_sft(SFTConfig(data=str(empty)), log=lambda _: None)
    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "a", "response": "b"}\n\n' + json.dumps({"prompt": "x" * 5000, "response": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"long.jsonl:3: \d+ tokens, over the model's context of 2048"):
        run_sft(SFTConfig(data=str(long)), log=lambda _: None)
    with pytest.raises(ValueError, match="epochs: must be >= 1"):
        SFTConfig(data=str(long), epochs=0)


def test_trainer_save_load_and_convert_export(tmp_path):
    from leagues.cli.main import main

    trainer = Trainer("tiny-moe", TrainerConfig(optim=OptimConfig(lr=1e-3)))
    trainer.train_step(make_samples(4))
    path = trainer.save(tmp_path / "ckpt", extra={"position": 7})
    resumed = Trainer("tiny-moe", TrainerConfig(optim=OptimConfig(lr=1e-3)))
    assert resumed.load(path) == {"position": 7} and resumed.step == 1
    for (name, a), (_, b) in zip(trainer.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    out = tmp_path / "hf"
    assert main(["convert", "--model", "tiny-moe", "--checkpoint", str(path), "--out", str(out)]) == 0
    exported = load_pretrained(out)
    for (name, a), (_, b) in zip(trainer.model.named_parameters(), exported.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_each_step_starts_from_clean_gradients():
    """Two steps equal a fresh trainer's second step from the first step's weights and optimizer state."""
    first, second = make_samples(6, seed=1), make_samples(6, seed=2)
    trainer = Trainer("tiny-moe", TrainerConfig(optim=OptimConfig(lr=1e-3)))
    trainer.train_step(first)
    assert all(p.grad is None for p in trainer.model.parameters())
    fresh = Trainer("tiny-moe", TrainerConfig(optim=OptimConfig(lr=1e-3)))
    fresh.model.load_state_dict(trainer.model.state_dict())
    grads_second = grads_after_backward(trainer, second)
    for name, grad in grads_after_backward(fresh, second).items():
        assert torch.equal(grad, grads_second[name]), name


def test_a_step_with_nothing_to_learn_from_leaves_the_weights():
    """Every sample of a step failed (its reward raised, say): the step reports 0 tokens instead of crashing."""
    trainer = Trainer("tiny-moe", TrainerConfig(optim=OptimConfig(lr=1e-2)))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = trainer.train_step([])
    assert metrics["tokens"] == 0.0 and metrics["loss"] == 0.0
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_compile_setting_is_checked_and_auto_stays_off_on_the_cpu():
    with pytest.raises(ValueError, match="trainer.compile: expected auto, true or false, got 'yes'"):
        TrainerConfig(compile="yes")
    with pytest.raises(ValueError, match="compile_pad_multiple: must be >= 1"):
        TrainerConfig(compile_pad_multiple=0)
    assert TrainerConfig(compile=True).compile == "true" and TrainerConfig(compile=False).compile == "false"
    trainer = Trainer("tiny-moe", TrainerConfig())  # auto: compiled on CUDA only
    assert trainer.compiled == torch.cuda.is_available() and trainer.model.pad_to == (1024 if trainer.compiled else 1)
