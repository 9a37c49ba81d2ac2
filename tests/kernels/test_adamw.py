"""The AdamW kernel that writes compute copies (`leagues.kernels.adamw`) against its reference and torch's AdamW
(the kernel under Triton's interpreter without a GPU), and `CastingAdamW` against torch's AdamW plus a cast."""

import os

import pytest
import torch

from leagues.kernels import adamw
from leagues.parallel import apply_compute_copies, compute_copies, refresh
from leagues.train.optim import CastingAdamW, OptimConfig, build_optimizer, optimizer_step
from tests.parallel.test_parallel import make_model

pytestmark = pytest.mark.gpu  # also on the GPU machine's `-m gpu` run: there the kernel is the real one
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(
    adamw.triton is None or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton: a GPU or the interpreter",
)
HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}


def _state(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    param, grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    return [t.to(DEVICE) for t in (param, grad, torch.zeros(n), torch.zeros(n))]


@needs_kernel
@pytest.mark.parametrize("scaled", [False, True])
def test_kernel_matches_the_reference_and_writes_the_copy(scaled):
    n = 2 * adamw.BLOCK + 37  # a partial last block
    ours, ref = _state(n, 0), _state(n, 0)
    copy = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    scale = torch.tensor(3.0, device=DEVICE) if scaled else None
    for step in (1, 2, 3):
        hp = adamw.AdamWStep(step=step, **HYPER, grad_scale=scale)
        adamw.adamw_step_(*ours, copy, hp)
        adamw.adamw_reference_(*ref, None, hp)
        for got, want in zip(ours, ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # a few float32 roundings apart
        assert torch.equal(copy, ours[0].bfloat16())  # rounded as `Tensor.to` rounds


def test_reference_is_torchs_adamw():
    param, grad, _, _ = _state(300, 1)
    theirs = torch.nn.Parameter(param.clone())
    opt = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, foreach=False)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    for step in (1, 2, 3):
        theirs.grad = grad * step
        opt.step()
        adamw.adamw_reference_(param, grad * step, exp_avg, exp_avg_sq, None, adamw.AdamWStep(step=step, **HYPER))
        torch.testing.assert_close(param, theirs.detach(), rtol=0, atol=0)


def _train(optimizer_kind: str, clip: float):
    """Three steps of a model with bf16 compute copies on the same seeded gradients (the optimizer alone: through
    the model, one float32 ulp between two kernels can round a bf16 weight the other way and move the next
    gradients): (model, optimizer)."""
    model = make_model().to(DEVICE)
    apply_compute_copies(model, torch.bfloat16)
    refresh(model)  # the copies exist before the first step
    cfg = OptimConfig(lr=1e-2, grad_clip=clip, fused=optimizer_kind)
    optimizer = build_optimizer(model.parameters(), cfg, compute_copies(model))
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=gen).to(DEVICE)
        optimizer_step(list(model.parameters()), optimizer, None, cfg)
        optimizer.zero_grad(set_to_none=True)
        refresh(model)
    return model, optimizer


def _trained(optimizer_kind: str, clip: float):
    """`_train`'s (masters, copies after the last step, optimizer)."""
    model, optimizer = _train(optimizer_kind, clip)
    copies = compute_copies(model).targets()
    return [p.detach() for p in model.parameters()], [copies[id(p)] for p in model.parameters()], optimizer


@needs_kernel
@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_casting_adamw_steps_as_torchs_adamw_then_a_cast(clip):
    ours, our_copies, optimizer = _trained("fused", clip)
    theirs, their_copies, reference = _trained("foreach", clip)
    assert isinstance(optimizer, CastingAdamW) and not isinstance(reference, CastingAdamW)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(c, p.bfloat16()) for c, p in zip(our_copies, ours, strict=True))  # written in the step
    state = optimizer.state_dict()  # torch's layout: loads into torch's AdamW
    assert set(state["state"][0]) == set(reference.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    reference.load_state_dict(state)


@needs_kernel
def test_casting_adamw_state_goes_through_the_checkpoints_state_dicts():
    """`get_state_dict` / `set_state_dict` (what checkpoints use) from a trained model and CastingAdamW into fresh
    ones: the same step and moments (the fresh optimizer's state is built first by a zero-lr step)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optimizer = _train("fused", 0.0)
    _, saved = get_state_dict(model, optimizer)
    fresh_model = make_model().to(DEVICE)
    fresh_model.load_state_dict(model.state_dict())
    apply_compute_copies(fresh_model, torch.bfloat16)
    fresh = build_optimizer(fresh_model.parameters(), OptimConfig(lr=1e-2, fused="fused"), compute_copies(fresh_model))
    fresh_sd, _ = get_state_dict(fresh_model, fresh)
    set_state_dict(fresh_model, fresh, model_state_dict=fresh_sd, optim_state_dict=saved)
    pairs = zip(fresh.param_groups[0]["params"], optimizer.param_groups[0]["params"], strict=True)
    for a, b in pairs:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh.state[a][key].cpu(), optimizer.state[b][key].cpu()), key
    assert all(torch.equal(a, b) for a, b in zip(fresh_model.parameters(), model.parameters(), strict=True))
