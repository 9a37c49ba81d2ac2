"""Parallel configuration and the device mesh every parallelism in `leagues.parallel` is applied over.

World = the ranks that train (every rank of the job, or the trainer ranks of a disaggregated job), and data
parallelism spans all of them: every rank gets its own tokens. Expert
parallelism splits the experts of each MoE layer over groups of `ep` consecutive ranks, so the world
is laid out as a 2-D mesh `(dp_shard, ep) = (world / ep, ep)`, row-major: rank r sits in expert group
r // ep and holds expert shard r % ep.

Meshes handed out (`ParallelMesh`):
- `dp`: all ranks, 1-D (the 2-D mesh flattened). FSDP of every non-expert parameter, batch balancing.
- `ep`: the `ep` ranks of one expert group (one row). Token all-to-all; each holds E/ep experts.
- `dp_ep`: the ranks holding the same expert shard (one column, size world/ep). FSDP of expert params.

Decisions:
- One `init_device_mesh` call makes every process group; `dp` is the flattened view of both axes
  (`DeviceMesh._flatten`), so no group is built by hand and DTensors of both meshes share a root mesh.
- A mesh over some of the job's ranks (a disaggregated job's trainer ranks) is the same mesh over those ranks:
  every rank of the job builds it, since making a process group is collective over the whole job, and the
  ranks outside it get None. Built once, before any trainer, and handed to each (warm start, RL trainer).
- Validation errors name the config field (`ep`), as every config in leagues does.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
AUTO_PARAM_DTYPE: dict[str, str] = {"cuda": "bfloat16"}
"""What `param_dtype="auto"` means per device type; any other device computes in float32."""


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """How the trainer spreads over its ranks. On one rank (no `ep`, no `cpu_offload`) nothing is sharded: the model
    keeps its float32 masters and runs on `param_dtype` copies cast once per step (`leagues.parallel.compute`),
    so `reduce_dtype`, `reshard_after_forward`, `grad_reduce` and `grad_accumulation` have nothing to act on."""

    ep: int = 1
    """Expert-parallel degree: each MoE layer's experts are split over this many ranks (1: no expert parallel)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward instead of keeping its activations."""
    param_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Compute dtype of parameters in forward and backward (FSDP2 mixed precision; on one rank, copies of the
    masters); "auto": bfloat16 on CUDA, float32 elsewhere. The master copy keeps the model's own dtype."""
    reduce_dtype: Literal["bfloat16", "float16", "float32"] = "float32"
    """Dtype in which gradients are reduce-scattered across ranks."""
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward (gathered again for backward): less memory,
    one more all-gather per block."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state on the CPU (FSDP2 `CPUOffloadPolicy`); build the
    optimizer after `parallelize`, and step it on the CPU."""
    grad_reduce: Literal["sum", "mean"] = "sum"
    """How gradients combine across ranks. "sum": the sum of every rank's gradient (each rank's loss is already
    normalised by the global token count). "mean": that sum divided by the world size (FSDP's default)."""

    grad_accumulation: Literal["sharded", "unsharded"] = "unsharded"
    """How gradients accumulate over one step's micro-batches. "unsharded": keep parameters gathered through the
    step, accumulate full float32 gradients, and reduce once at the end (one gather and one reduction per step;
    each rank holds its full share of parameters and gradients during the step; 1.2-1.7x faster steps on H100,
    benchmarks/RESULTS.md). "sharded": gather parameters and reduce-scatter gradients around every micro-batch
    (least memory, for models that only fit sharded)."""

    sharded_load: bool = False
    """Build the model on the meta device and let each rank read only its pieces of the checkpoint (its FSDP
    shard, its experts) instead of loading the whole model on every rank first: for models that do not fit a
    device whole (Qwen3-30B-A3B in float32 is 122 GB)."""

    def __post_init__(self) -> None:
        if self.grad_accumulation not in ("sharded", "unsharded"):
            raise ValueError(f"grad_accumulation must be sharded or unsharded, got {self.grad_accumulation!r}")
        if self.ep < 1:
            raise ValueError(f"ep must be >= 1, got {self.ep}")
        if self.param_dtype != "auto" and self.param_dtype not in DTYPES:
            raise ValueError(f"param_dtype must be auto or one of {sorted(DTYPES)}, got {self.param_dtype!r}")
        if self.reduce_dtype not in DTYPES:
            raise ValueError(f"reduce_dtype must be one of {sorted(DTYPES)}, got {self.reduce_dtype!r}")
        if self.grad_reduce not in ("sum", "mean"):
            raise ValueError(f"grad_reduce must be sum or mean, got {self.grad_reduce!r}")

    @property
    def accumulates_unsharded(self) -> bool:
        return self.grad_accumulation == "unsharded"

    def resolved_param_dtype(self, device_type: str) -> torch.dtype:
        name = AUTO_PARAM_DTYPE.get(device_type, "float32") if self.param_dtype == "auto" else self.param_dtype
        return DTYPES[name]


@dataclass(slots=True)
class ParallelMesh:
    world: DeviceMesh
    """The 2-D mesh ("dp_shard", "ep")."""
    dp: DeviceMesh
    """All ranks, 1-D: FSDP of non-expert parameters and batch balancing."""
    ep: DeviceMesh
    """The ranks of this rank's expert group (size ep): token all-to-all."""
    dp_ep: DeviceMesh
    """The ranks holding this rank's expert shard (size world / ep): FSDP of expert parameters."""

    @property
    def ep_size(self) -> int:
        return self.ep.size()

    @property
    def dp_size(self) -> int:
        return self.dp.size()


def build_mesh(
    cfg: ParallelConfig, world_size: int, device_type: str, ranks: Sequence[int] | None = None
) -> ParallelMesh | None:
    """The meshes for `world_size` ranks: the job's first ones, or `ranks` (that many of the job's ranks). Every
    rank of the job must call it (it creates process groups); a rank outside `ranks` gets None."""
    if world_size % cfg.ep:
        raise ValueError(f"ep ({cfg.ep}) must divide the world size ({world_size})")
    shape, names = (world_size // cfg.ep, cfg.ep), ("dp_shard", "ep")
    if ranks is None:
        world = init_device_mesh(device_type, shape, mesh_dim_names=names)
    else:
        assert len(ranks) == world_size, (ranks, world_size)
        world = DeviceMesh(device_type, torch.tensor(list(ranks), dtype=torch.int).view(shape), mesh_dim_names=names)
    dp = world["dp_shard", "ep"]._flatten("dp")
    if ranks is not None and dist.get_rank() not in ranks:
        return None
    return ParallelMesh(world=world, dp=dp, ep=world["ep"], dp_ep=world["dp_shard"])
