"""AdamW, learning-rate schedules and the guarded optimizer step of the trainer.

Sits at the end of every training step: after the losses' backward passes have filled `.grad`,
`optimizer_step` measures the gradient norm, clips, steps AdamW and advances the schedule.

    build_optimizer(params, cfg)                            -> torch.optim.AdamW
    build_scheduler(optimizer, cfg)                         -> LambdaLR over SCHEDULES[cfg.schedule]
    optimizer_step(params, optimizer, scheduler, cfg)       -> {"grad_norm", "lr", "skipped", "skipped_total"}

Decisions:
- Schedules are functions `(step, cfg) -> lr multiplier` in the `SCHEDULES` registry, wrapped by a
  `LambdaLR`. `step` counts optimizer steps taken so far, so step 0 is the first update. Warmup is
  linear and never zero: step s < warmup_steps uses (s + 1) / warmup_steps, so no step is wasted at
  lr 0. Cosine decays from the peak at step `warmup_steps` to `min_lr_ratio` at `total_steps`, and
  stays there after.
- The gradient norm is the norm of all gradients together, measured before clipping (the metric shows
  what the backward pass produced). Under FSDP2 the gradients are DTensors and so is their norm;
  `.full_tensor()` reduces it over the mesh, so every rank sees the same norm and takes the same branch.
- Non-finite guard: when the norm is inf or nan, the step is skipped on every rank: gradients are
  dropped, neither the optimizer nor the schedule steps, so weights and optimizer state stay bitwise
  as they were. Skips are counted in each param group under `SKIPPED_KEY`, so the count travels with
  the optimizer's state dict (and therefore with checkpoints).
- After a normal step the gradients are left in place, as with any torch optimizer: the caller zeroes
  them (`optimizer.zero_grad()`) before the next backward.
- One param group, weight decay on every parameter (norms and biases included), as torchtitan does;
  the effect on norm weights over a post-training run is negligible and it keeps the state simple.
- fused="auto" picks the fused AdamW kernel when every parameter lives on CUDA and torch's default
  (foreach) otherwise. The fused kernel also clips: it divides each gradient by the clip's factor (its
  `grad_scale`) as it reads it, so clipping costs no pass over the gradients of its own. On one rank with
  compute copies, fused is `CastingAdamW` (leagues' kernel, which also writes the copies in the same pass).
- Optimizer-state CPU offload is not done here: it comes from FSDP2's `CPUOffloadPolicy`, applied to
  the model in `leagues.parallel`; the parameters (and so the AdamW state) then live on the CPU and
  "auto" picks the non-fused path.
- Known limit: all gradients must be of one kind (all DTensors on one mesh, or all plain tensors);
  parameters sharded over different meshes (expert parallel) need their norms combined per mesh first.
"""

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from leagues.kernels.adamw import AdamWStep, adamw_step_, kernel_runs_on

SKIPPED_KEY = "num_skipped_steps"


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate (reached at the end of warmup)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW beta1 and beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay, applied to every parameter."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup; step s < warmup_steps uses lr * (s + 1) / warmup_steps."""
    schedule: str = "constant"
    """Learning-rate schedule after warmup: "constant" or "cosine" (see SCHEDULES)."""
    total_steps: int = 0
    """Optimizer updates at which the cosine schedule reaches `min_lr_ratio * lr`; 0: `leagues train` sets it to
    steps x updates per step (a Trainer built directly needs it for "cosine")."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine schedule, as a fraction of `lr`."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still measured)."""
    fused: str = "auto"
    """AdamW implementation: "auto" (fused on CUDA, else torch's default), "fused" or "foreach". Fused on one rank
    with compute copies is leagues' kernel, which writes the copies as it steps (`CastingAdamW`)."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule: unknown schedule {self.schedule!r} (choose from {sorted(SCHEDULES)})")
        if self.fused not in ("auto", "fused", "foreach"):
            raise ValueError(f"optim.fused: expected auto, fused or foreach, got {self.fused!r}")
        for key in ("lr", "eps", "weight_decay", "warmup_steps", "total_steps", "grad_clip"):
            if getattr(self, key) < 0:
                raise ValueError(f"optim.{key}: must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.schedule == "cosine" and 0 < self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"optim.total_steps: the cosine schedule needs total_steps > warmup_steps, "
                f"got {self.total_steps} <= {self.warmup_steps}"
            )


# ---------------------------------------------------------------------------------------------------
# schedules: (optimizer steps taken so far, config) -> multiplier of cfg.lr

Schedule = Callable[[int, OptimConfig], float]
SCHEDULES: dict[str, Schedule] = {}


def register_schedule(name: str) -> Callable[[Schedule], Schedule]:
    def register(fn: Schedule) -> Schedule:
        SCHEDULES[name] = fn
        return fn

    return register


def warmup_factor(step: int, cfg: OptimConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return 1.0


@register_schedule("constant")
def constant_schedule(step: int, cfg: OptimConfig) -> float:
    return warmup_factor(step, cfg)


@register_schedule("cosine")
def cosine_schedule(step: int, cfg: OptimConfig) -> float:
    if step < cfg.warmup_steps:
        return warmup_factor(step, cfg)
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------
# building


class CastingAdamW(torch.optim.AdamW):
    """torch's AdamW (same hyper-parameters, state and checkpoints) whose step also writes each parameter's compute
    copy (`leagues.parallel.compute`): one Triton pass a parameter over it, its gradient, both moments and the copy
    (`leagues.kernels.adamw`) instead of torch's step and then a cast. It divides each gradient by `grad_scale` (a
    device scalar, set by `optimizer_step` to clip) as it reads it. Parameters the kernel cannot take (not on
    CUDA, or sparse, or without a copy yet) step through torch's AdamW."""

    def __init__(self, params, copies, **kwargs) -> None:
        super().__init__(params, foreach=False, **kwargs)
        self.copies = copies  # a `ComputeCopies`
        self.grad_scale: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "CastingAdamW takes no closure"
        targets = self.copies.targets()
        rest, done = [], []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                copy = targets.get(id(param))
                if param.grad is None:
                    continue
                if copy is None or not kernel_runs_on(param) or param.grad.is_sparse or group["amsgrad"]:
                    rest.append(param)
                    continue
                state = self.state[param]
                if not state:  # torch's layout: a float32 step on the CPU (its non-fused default), two moments
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                hp = AdamWStep(
                    step=int(state["step"].item()), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], grad_scale=self.grad_scale,
                )  # fmt: skip
                adamw_step_(param, param.grad, state["exp_avg"], state["exp_avg_sq"], copy, hp)
                done.append(param)
        self.copies.mark_cast(done)  # written by the kernel: fresh, no cast before the next forward
        if rest:
            self._step_rest(rest)

    def _step_rest(self, params: list[torch.Tensor]) -> None:
        """torch's AdamW step over `params` alone (the others' gradients hidden from it for the call)."""
        hidden, taken = {}, {id(p) for p in params}
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None and id(param) not in taken:
                    hidden[param] = param.grad
                    param.grad = None
        try:
            if self.grad_scale is not None:  # torch's non-fused step knows no grad_scale: clip these first
                torch._foreach_div_([p.grad for p in params], self.grad_scale)
            super().step()
        finally:
            for param, grad in hidden.items():
                param.grad = grad


def _fused_kwargs(params: list[torch.Tensor], fused: str) -> dict[str, bool]:
    if fused == "fused":
        return {"fused": True}
    if fused == "foreach":
        return {"foreach": True}
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    return {"fused": True} if on_cuda else {}


def build_optimizer(params: Iterable[torch.Tensor], cfg: OptimConfig, copies=None) -> torch.optim.AdamW:
    """AdamW over `params` (one group), with the skip counter at 0. `copies`: the model's compute copies (one rank,
    `leagues.parallel.compute`); with them on CUDA, fused means `CastingAdamW`, which writes them as it steps."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: no trainable parameters")
    hyper = {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    kwargs = _fused_kwargs(params, cfg.fused)
    if copies is not None and kwargs.get("fused") and all(kernel_runs_on(p) for p in params):
        optimizer = CastingAdamW(params, copies, **hyper)
    else:
        optimizer = torch.optim.AdamW(params, **hyper, **kwargs)
    for group in optimizer.param_groups:
        group[SKIPPED_KEY] = 0
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> LambdaLR:
    """The configured schedule as a `LambdaLR` (multiplier of each group's initial lr)."""
    if cfg.schedule == "cosine" and cfg.total_steps == 0:
        raise ValueError("optim.total_steps: the cosine schedule needs the number of optimizer updates")
    return LambdaLR(optimizer, functools.partial(SCHEDULES[cfg.schedule], cfg=cfg))


# ---------------------------------------------------------------------------------------------------
# the step


def grad_norm(params: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Global L2 norm of the gradients of `params` (a plain tensor).

    Sharded gradients (FSDP2 DTensors, possibly on different meshes: experts under expert parallel
    live on their own) hold disjoint pieces, so the squared norm is the sum over every rank of the
    squares of its local shards: one all-reduce over the whole group (`group`: the ranks that train;
    None: every rank of the job), whatever the meshes.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    local = [(g.to_local() if isinstance(g, DTensor) else g).detach() for g in grads]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in local:  # one multi-tensor norm per dtype, not a pow and a sum per tensor
        by_dtype.setdefault(t.dtype, []).append(t)
    norms = [n.float() for ts in by_dtype.values() for n in torch._foreach_norm(ts, 2.0)]
    squares = torch.stack(norms).double().square().sum()  # float64: the sum of shards matches one process closely
    if dist.is_initialized():
        dist.all_reduce(squares, group=group)
    return squares.sqrt()


def clip_grads(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale gradients in place to a total norm of at most `max_norm` (shard by shard: meshes may differ)."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    grads: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        grads.setdefault((grad.device, grad.dtype), []).append(grad)
    for (device, dtype), group in grads.items():  # one multi-tensor scale per device and dtype
        torch._foreach_mul_(group, coef.to(device, dtype))


def optimizer_step(
    params: Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR | None,
    cfg: OptimConfig,
    group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """Clip, step and advance the schedule, or skip everything when the gradient norm is not finite (the norm
    over `group`, as `grad_norm`).

    Returns the pre-clip `grad_norm`, the `lr` this step used, `skipped` (0 or 1) and `skipped_total`.
    """
    params = [p for p in params if p.grad is not None]
    norm = grad_norm(params, group)
    lr = float(optimizer.param_groups[0]["lr"])
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        for p in params:  # also the ones the optimizer does not own
            p.grad = None
        for group in optimizer.param_groups:
            group[SKIPPED_KEY] = group.get(SKIPPED_KEY, 0) + 1
        return _metrics(norm, lr, 1, optimizer)
    fused_clip = cfg.grad_clip > 0 and (bool(optimizer.defaults.get("fused")) or isinstance(optimizer, CastingAdamW))
    if fused_clip:  # the fused kernel divides each gradient by grad_scale as it reads it: no pass of its own
        optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / cfg.grad_clip, min=1.0)
    elif cfg.grad_clip > 0:
        clip_grads(params, cfg.grad_clip, norm)
    try:
        optimizer.step()
    finally:
        optimizer.grad_scale = None
    if scheduler is not None:
        scheduler.step()
    return _metrics(norm, lr, 0, optimizer)


def _metrics(norm: torch.Tensor, lr: float, skipped: int, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {
        "grad_norm": norm.item(),
        "lr": lr,
        "skipped": float(skipped),
        "skipped_total": float(optimizer.param_groups[0].get(SKIPPED_KEY, 0)),
    }
