"""Optimizer and schedules: hand-computed lr values, clipping, the non-finite guard, a plain step."""

import copy
import math

import pytest
import torch

from leagues.train.optim import (
    SKIPPED_KEY,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    optimizer_step,
)


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]


def set_grads(params, value: float | None = None, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.full_like(p, value) if value is not None else torch.randn(p.shape, generator=gen)


def lrs_over(cfg: OptimConfig, num_steps: int) -> list[float]:
    """The lr each of `num_steps` optimizer steps uses."""
    params = make_params()
    optimizer = build_optimizer(params, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    out = []
    for _ in range(num_steps):
        set_grads(params)
        out.append(optimizer_step(params, optimizer, scheduler, cfg)["lr"])
    return out


def test_warmup_then_cosine_lr():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", total_steps=8, min_lr_ratio=0.1)
    lrs = lrs_over(cfg, 10)
    cos = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    expected = [0.25, 0.5, 0.75, 1.0, *cos, 0.1]  # steps 4..8 walk the cosine, then it stays at the floor
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[6] == pytest.approx(0.55)  # halfway through the decay: (1 + 0.1) / 2


def test_constant_schedule_with_and_without_warmup():
    assert lrs_over(OptimConfig(lr=2.0, schedule="constant"), 3) == pytest.approx([2.0, 2.0, 2.0])
    assert lrs_over(OptimConfig(lr=2.0, warmup_steps=2), 4) == pytest.approx([1.0, 2.0, 2.0, 2.0])


def test_clipping_reports_pre_clip_norm_and_scales_grads():
    params = make_params()
    cfg = OptimConfig(lr=0.0, grad_clip=1.0, weight_decay=0.0)
    optimizer = build_optimizer(params, cfg)
    set_grads(params, value=2.0)  # 17 elements of 2.0: norm 2 * sqrt(17)
    metrics = optimizer_step(params, optimizer, None, cfg)
    assert metrics["grad_norm"] == pytest.approx(2 * math.sqrt(17))
    assert metrics["skipped"] == 0
    clipped = torch.cat([p.grad.flatten() for p in params])
    assert clipped.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(clipped, torch.full_like(clipped, 1 / math.sqrt(17)), rtol=1e-5)


def test_the_fused_optimizer_clips_inside_its_step_like_an_explicit_clip():
    """Fused AdamW divides each gradient by the clip's factor as it reads it: the same update (within rounding) as
    scaling the gradients first and stepping the foreach AdamW; a step within the clip is not scaled."""
    results = {}
    for fused in ("fused", "foreach"):
        params = make_params()
        cfg = OptimConfig(lr=1e-2, grad_clip=1.0, fused=fused)
        optimizer = build_optimizer(params, cfg)
        assert bool(optimizer.defaults.get("fused")) == (fused == "fused")
        for scale in (3.0, 0.01):  # the first step is clipped, the second is not
            set_grads(params)
            for p in params:
                p.grad.mul_(scale)
            optimizer_step(params, optimizer, None, cfg)
            if scale == 3.0:  # Adam's first moment after one step: (1 - beta1) x the clipped gradient, of norm 1
                moment = torch.cat([optimizer.state[p]["exp_avg"].flatten() for p in params]) / (1 - cfg.betas[0])
                assert moment.norm().item() == pytest.approx(1.0, rel=1e-5)
        assert getattr(optimizer, "grad_scale", None) is None
        state = [optimizer.state[p][k].clone() for p in params for k in ("exp_avg", "exp_avg_sq")]
        results[fused] = [p.detach().clone() for p in params] + state
    for a, b in zip(results["fused"], results["foreach"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_grad_clip_zero_measures_but_does_not_clip():
    params = make_params()
    cfg = OptimConfig(lr=0.0, grad_clip=0.0)
    optimizer = build_optimizer(params, cfg)
    set_grads(params, value=2.0)
    assert optimizer_step(params, optimizer, None, cfg)["grad_norm"] == pytest.approx(2 * math.sqrt(17))
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in params)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_grads_skip_the_step(bad):
    params = make_params()
    cfg = OptimConfig(lr=0.1, warmup_steps=3, schedule="cosine", total_steps=10)
    optimizer = build_optimizer(params, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    set_grads(params)
    optimizer_step(params, optimizer, scheduler, cfg)  # a real step first, so there is state to protect
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(optimizer.state_dict())
    before_sched = scheduler.state_dict()

    set_grads(params)
    params[1].grad[2] = bad
    metrics = optimizer_step(params, optimizer, scheduler, cfg)

    assert metrics["skipped"] == 1 and metrics["skipped_total"] == 1
    assert not math.isfinite(metrics["grad_norm"])
    assert all(p.grad is None for p in params)
    assert all(torch.equal(a, b) for a, b in zip(before_params, params, strict=True))
    after_state = optimizer.state_dict()
    for idx, state in before_state["state"].items():
        for key, value in state.items():
            assert torch.equal(value, after_state["state"][idx][key]), key
    assert scheduler.state_dict() == before_sched
    assert optimizer.param_groups[0][SKIPPED_KEY] == 1

    set_grads(params)  # the next good step goes on where the schedule left off
    metrics = optimizer_step(params, optimizer, scheduler, cfg)
    assert metrics["skipped"] == 0 and metrics["skipped_total"] == 1
    assert metrics["lr"] == pytest.approx(0.1 * 2 / 3)


def test_a_normal_step_changes_parameters():
    params = make_params()
    cfg = OptimConfig(lr=1e-2)
    optimizer = build_optimizer(params, cfg)
    before = [p.detach().clone() for p in params]
    set_grads(params)
    metrics = optimizer_step(params, optimizer, build_scheduler(optimizer, cfg), cfg)
    assert metrics["skipped"] == 0 and metrics["lr"] == pytest.approx(1e-2)
    assert all(not torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert all(int(optimizer.state[p]["step"]) == 1 for p in params)


def test_skip_counter_survives_state_dict_round_trip():
    params = make_params()
    cfg = OptimConfig()
    optimizer = build_optimizer(params, cfg)
    set_grads(params, value=math.nan)
    optimizer_step(params, optimizer, None, cfg)
    fresh = build_optimizer(params, cfg)
    fresh.load_state_dict(optimizer.state_dict())
    assert fresh.param_groups[0][SKIPPED_KEY] == 1


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"schedule": "linear"}, "optim.schedule"),
        ({"schedule": "cosine", "total_steps": 2, "warmup_steps": 3}, "optim.total_steps"),
        ({"lr": -1.0}, "optim.lr"),
        ({"min_lr_ratio": 2.0}, "optim.min_lr_ratio"),
        ({"fused": "yes"}, "optim.fused"),
    ],
)
def test_bad_config_raises_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        OptimConfig(**kwargs)


def test_cosine_without_total_steps_is_refused_when_the_schedule_is_built():
    params = [torch.nn.Parameter(torch.zeros(2))]
    cfg = OptimConfig(schedule="cosine")  # leagues train fills total_steps in; a direct build must not guess
    with pytest.raises(ValueError, match="optim.total_steps"):
        build_scheduler(build_optimizer(params, cfg), cfg)
