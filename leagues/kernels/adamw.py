"""AdamW that also writes the parameter's compute-dtype copy, in one pass over memory.

Where it sits: the trainer's optimizer on one rank with compute copies (`leagues.parallel.compute`,
`leagues.train.optim.CastingAdamW`). AdamW streams the float32 parameter, gradient and both moments; the copy
the next forward reads (bf16) was then a second pass over the parameters (read float32, write bf16). Here the
kernel writes the copy from the updated value it already holds: 2 more bytes a parameter instead of 6.

    adamw_step_(param, grad, exp_avg, exp_avg_sq, copy, AdamWStep(step=1, lr=1e-6, beta1=0.9, ...))

The arithmetic is torch's AdamW (decoupled weight decay, bias corrections from the step count), with the
gradient first divided by `grad_scale` (a device scalar: the clip's factor, as torch's fused kernel takes it).
Triton on CUDA (one program per block of 2,048 elements; contiguous tensors), the pure-torch reference
elsewhere; both round the copy as `Tensor.to` does.
"""

import math
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the reference needs none
    triton = None

BLOCK = 2048


@dataclass(frozen=True, slots=True)
class AdamWStep:
    """One update's hyper-parameters: `step` counts this update (1 for the first); `grad_scale` (a device scalar or
    None) divides the gradient as it is read (the clip's factor)."""

    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_scale: torch.Tensor | None = None


def adamw_reference_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    copy: torch.Tensor | None,
    hp: AdamWStep,
) -> None:
    """torch's AdamW update of one parameter, in place, then `copy` (if any) set to the new value in its dtype."""
    grad = grad.float() if hp.grad_scale is None else grad.float() / hp.grad_scale
    param.mul_(1 - hp.lr * hp.weight_decay)
    exp_avg.lerp_(grad, 1 - hp.beta1)
    exp_avg_sq.mul_(hp.beta2).addcmul_(grad, grad, value=1 - hp.beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - hp.beta2**hp.step)).add_(hp.eps)
    param.addcdiv_(exp_avg, denom, value=-hp.lr / (1 - hp.beta1**hp.step))
    if copy is not None:
        copy.copy_(param)


if triton is not None:

    @triton.jit
    def _adamw_kernel(
        param_ptr,
        grad_ptr,
        exp_avg_ptr,
        exp_avg_sq_ptr,
        copy_ptr,
        scale_ptr,
        n,
        lr,
        beta1,
        beta2,
        eps,
        decay,
        step_size,
        bias2_sqrt,
        HAS_COPY: tl.constexpr,
        COPY_BF16: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(param_ptr + offs, mask=mask)
        g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
        if HAS_SCALE:  # IEEE division and square root, as torch's (Triton's defaults are approximate on GPUs)
            g = tl.div_rn(g, tl.load(scale_ptr))
        m = tl.load(exp_avg_ptr + offs, mask=mask)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask)
        p = p * decay
        m = m + (1 - beta1) * (g - m)
        v = v * beta2 + (1 - beta2) * g * g
        p = p - step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps)
        tl.store(param_ptr + offs, p, mask=mask)
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
        if COPY_BF16:  # round to nearest even by hand: Triton's interpreter truncates in `.to(tl.bfloat16)`
            bits = p.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            tl.store(copy_ptr + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        elif HAS_COPY:
            tl.store(copy_ptr + offs, p.to(copy_ptr.dtype.element_ty), mask=mask)


def kernel_runs_on(param: torch.Tensor) -> bool:
    """Whether `adamw_step_` takes the Triton kernel for this parameter (CUDA, or Triton's CPU interpreter)."""
    return triton is not None and (param.is_cuda or (param.device.type == "cpu" and _interpreting()))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    copy: torch.Tensor | None,
    hp: AdamWStep,
) -> None:
    """One AdamW update of `param` (float32, contiguous) and its moments in place, writing `copy` too (any dtype,
    or None)."""
    if not kernel_runs_on(param):
        adamw_reference_(param, grad, exp_avg, exp_avg_sq, copy, hp)
        return
    tensors = (param, grad, exp_avg, exp_avg_sq) + ((copy,) if copy is not None else ())
    assert all(t.is_contiguous() and t.numel() == param.numel() for t in tensors), "adamw_step_: contiguous, same size"
    n = param.numel()
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        param, grad, exp_avg, exp_avg_sq,
        copy if copy is not None else param,
        hp.grad_scale if hp.grad_scale is not None else param,
        n, hp.lr, hp.beta1, hp.beta2, hp.eps,
        1 - hp.lr * hp.weight_decay,
        hp.lr / (1 - hp.beta1**hp.step),
        math.sqrt(1 - hp.beta2**hp.step),
        HAS_COPY=copy is not None,
        COPY_BF16=copy is not None and copy.dtype == torch.bfloat16,
        HAS_SCALE=hp.grad_scale is not None,
        BLOCK=BLOCK,
    )  # fmt: skip
