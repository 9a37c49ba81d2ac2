"""FSDP2 over the mesh, activation checkpointing, `parallelize` (all of it in order), and gathering full
weights back out of the shards.

On a mesh of one rank (no `cpu_offload`) `parallelize` applies no FSDP: the model gets compute copies beside its
float32 masters instead (`leagues.parallel.compute`), and `whole_parameters` hands those copies out.

Order: expert parallel (splits the experts) -> activation checkpointing (wraps each block) -> FSDP2
(`fully_shard` each expert module over `dp_ep` when expert-parallel, then each block over `dp`, then
the root). `Transformer.run` and `Transformer.logits` are registered as FSDP forward methods, so the
trainer may call them directly (hidden states from `run`, logits in vocab chunks from `logits`).

Gradient reduction (`ParallelConfig.grad_reduce`). The trainer's objective is the SUM over ranks of
each rank's loss, each already normalised by the global token count; its gradient is the sum over
ranks of the per-rank gradients.
- Non-expert parameters are replicated in compute: each rank's backward yields the gradient of its own
  loss, and reduce-scattering over `dp` (all ranks) with SUM gives the gradient of the sum.
- Expert parameters under EP: the backward of the token all-to-all sends each row's gradient back to the
  rank holding its expert, so a rank's local expert gradient already sums the contributions of every
  rank in its expert group. The ranks holding the same expert shard (`dp_ep`, one per expert group)
  then reduce-scatter with SUM, which adds the remaining groups: again the gradient of the sum over
  all ranks.
So both reductions are plain SUMs (divide factor 1). FSDP's default divides each by its own group
size, world for `dp` but only world/ep for `dp_ep`, which would scale the expert gradients by ep
relative to the rest. "mean" therefore divides every unit by the same world size (what torchtitan does).
On gloo (CPU), whose reduce-scatter knows only SUM, the division runs after the collective.

Gradient accumulation (`ParallelConfig.grad_accumulation`): "sharded" gathers and reduces around
every micro-batch; "unsharded" keeps parameters gathered through a step's micro-batches (FSDP2's
`set_reshard_after_backward(False)`) and skips the reduction (`set_requires_gradient_sync(False)`),
so FSDP accumulates unsharded gradients in the reduce dtype and reduces once, after the last one.

Decisions:
- The root unit follows FSDP2's own heuristic (not resharded after forward: backward needs it first).
- `full_state_dict` gathers onto every rank (the gathers are collectives anyway; rank 0 alone may keep
  what it needs), bucket by bucket so one bucket of full tensors is alive at a time.
"""

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from leagues.parallel.compute import apply_compute_copies, compute_copies
from leagues.parallel.expert_parallel import ExpertParallelExperts, apply_ep
from leagues.parallel.mesh import DTYPES, ParallelConfig, ParallelMesh, build_mesh

FORWARD_METHODS = ("run", "logits")
"""Methods of the root model that the trainer calls directly and that must gather the root's parameters."""


def parallelize(
    model: nn.Module, cfg: ParallelConfig, world_size: int, device_type: str, mesh: ParallelMesh | None = None
) -> ParallelMesh:
    """Apply expert parallel, activation checkpointing and FSDP2 to `model` in place; every rank of the mesh calls
    it. `mesh`: one built before (a second model sharded like the first, e.g. the frozen reference; a mesh over
    some of the job's ranks); None: a new one over every rank of the job. On a mesh of one rank (and no
    `cpu_offload`) there is nothing to shard: no FSDP, compute-dtype copies beside the masters instead
    (`leagues.parallel.compute`)."""
    mesh = mesh or build_mesh(cfg, world_size, device_type)
    if cfg.ep > 1:
        apply_ep(model, mesh.ep)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if mesh.dp_size == 1 and not cfg.cpu_offload:
        apply_compute_copies(model, cfg.resolved_param_dtype(device_type))
    else:
        apply_fsdp(model, mesh, cfg, device_type)
    return mesh


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap each block of `model.layers` so its activations are recomputed in backward."""
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block)


def apply_fsdp(model: nn.Module, mesh: ParallelMesh, cfg: ParallelConfig, device_type: str) -> None:
    """`fully_shard` expert modules over `dp_ep`, blocks over `dp`, then the root; see the module docstring."""
    kwargs = {
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=cfg.resolved_param_dtype(device_type), reduce_dtype=DTYPES[cfg.reduce_dtype]
        ),
        "reshard_after_forward": cfg.reshard_after_forward,
    }
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device_type == "cuda")
    if cfg.accumulates_unsharded:  # gathered once per step: see `set_last_microbatch`
        kwargs["reshard_after_forward"] = False
    factor = 1.0 if cfg.grad_reduce == "sum" else float(mesh.dp_size)
    for block in model.layers:
        experts = getattr(getattr(block, "moe", None), "experts", None)
        if isinstance(experts, ExpertParallelExperts):
            shard(experts, mesh.dp_ep, factor, **kwargs)
        shard(block, mesh.dp, factor, **kwargs)
    # The root (embeddings, final norm, LM head) stays gathered after forward: the trainer's chunked
    # LM head reads `lm_head.weight` right after `run`, and the backward needs it again at once.
    shard(model, mesh.dp, factor, **kwargs | {"reshard_after_forward": False})
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)


def reshard(model: nn.Module) -> None:
    """Free every FSDP unit's gathered parameters, leaving each rank its shards. After a no-grad pass of a model
    that never runs a backward (a frozen reference or teacher) this is what frees them: units not resharded
    after forward (the root always, every unit with "unsharded" accumulation) would otherwise stay gathered
    until the next pass, and a gathered frozen model would hold its whole share on the device between uses."""
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def set_last_microbatch(model: nn.Module, cfg: ParallelConfig, last: bool) -> None:
    """Before each micro-batch's backward: with unsharded accumulation, reduce gradients and reshard
    parameters only after the step's last micro-batch (earlier ones accumulate full float32 gradients)."""
    if cfg.accumulates_unsharded and isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)


def shard(module: nn.Module, mesh: DeviceMesh, divide_factor: float, **kwargs) -> None:
    """`fully_shard` one unit and set how its gradients are reduced (see the module docstring)."""
    fully_shard(module, mesh=mesh, **kwargs)
    # On a group of one a set factor costs a division pass over every gradient even when it is 1 (FSDP's copy
    # path divides by any factor it was given); the sum of one needs none.
    if mesh.size() > 1 or divide_factor != 1.0:
        module.set_gradient_divide_factor(divide_factor)
    # gloo reduces with SUM only (no AVG, no PREMUL_SUM). Not on a group of one: there FSDP (torch 2.13)
    # would divide twice, once on its copy path and again after it.
    if mesh.size() > 1 and dist.get_backend(mesh.get_group()) == "gloo":
        module.set_force_sum_reduction_for_comms(True)


def full_state_dict_buckets(
    model: nn.Module, bucket_bytes: int = 256 << 20
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Full, unsharded parameters in buckets of about `bucket_bytes` (a larger tensor gets a bucket alone).

    Every rank must iterate in step (each tensor is gathered by a collective) and every rank gets the data.
    Names are the single-device model's (no checkpoint-wrapper prefix); expert weights come back as [E, ...].
    Call it outside forward/backward, while the parameters are sharded.
    """
    bucket, size = [], 0
    for name, module, param in _parameters(model):
        tensor = _full_tensor(module, param)
        if bucket and size + tensor.nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.nbytes
    if bucket:
        yield bucket


def unit_buckets(model: nn.Module) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Full parameters in the compute dtype, one bucket per FSDP unit: FSDP2's own `unshard` (one all-gather
    of the unit's flat shards, in `param_dtype`), read, then `reshard`. The bucket's tensors are the unit's
    gathered storage (plus the expert-parallel all-gather), valid only until the next bucket is requested:
    copy them before asking for more.

    With bf16 compute these are exactly the weights the trainer's forward uses (the cast happens before the
    gather) at half the bytes of `full_state_dict`'s float32 gathers, in a few large collectives instead of
    one per tensor. Every rank must iterate in step. Call it outside forward/backward."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    owner = {}  # each parameter's innermost unit
    for unit in units:
        for param in unit.parameters():
            owner[id(param)] = unit
    by_unit: dict[int, list] = {id(unit): [] for unit in units}
    for name, module, param in _parameters(model):
        if id(param) in owner:
            by_unit[id(owner[id(param)])].append((name, module, param))
    for unit in reversed(units):  # the root last: its own parameters are the embeddings and the final norm
        mine = by_unit[id(unit)]
        if not mine:
            continue
        unit.unshard()
        try:
            bucket = []
            for name, module, _ in mine:
                tensor = getattr(module, name.rsplit(".", 1)[-1]).detach()  # the unsharded parameter now
                bucket.append((name, _gather_experts(module, tensor)))
            yield bucket
        finally:
            unit.reshard()


def whole_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """On a mesh of one rank: (name, tensor) for every parameter, with no gather. A model with compute copies
    (`parallelize` on one rank) gives its copies, refreshed: the forward's very weights in the compute dtype.
    Otherwise each parameter's local tensor is the whole parameter (a view in the master dtype; a receiver
    that copies it into the compute dtype rounds as the compute cast does)."""
    copies = compute_copies(model)
    by_master = copies.named_copies() if copies is not None else {}
    pairs = []
    for name, _, param in _parameters(model):
        if isinstance(param, DTensor):
            if param.device_mesh.size() != 1:
                raise ValueError(f"whole_parameters: {name!r} is sharded over {param.device_mesh.size()} ranks")
            param = param.to_local()
        pairs.append((name, by_master.get(id(param), param).detach()))
    return pairs


def load_full_tensors(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """The inverse of `full_state_dict`: copy this rank's pieces of full tensors (our names, any device) into the
    parallelized model's parameters: an expert-parallel module's slice of the experts, then FSDP's dim-0 chunk.
    Tensors may already hold only this rank's experts. Every rank calls it; no collectives. Returns the count."""
    params = {name: (module, param) for name, module, param in _parameters(model)}
    count = 0
    for name, full in named_tensors:
        if name not in params:
            raise ValueError(f"weight {name!r} matches no parameter of the model")
        module, param = params[name]
        if isinstance(module, ExpertParallelExperts) and full.shape[0] == module.num_experts:
            lo = dist.get_rank(module.ep_group) * module.num_local
            full = full[lo : lo + module.num_local]
        local = param.to_local() if isinstance(param, DTensor) else param
        if isinstance(param, DTensor):
            chunks = torch.chunk(full, param.device_mesh.size(), dim=0)  # FSDP2's sharding of dim 0
            rank = param.device_mesh.get_local_rank()
            full = chunks[rank] if rank < len(chunks) else full[:0]
        if tuple(local.shape) != tuple(full.shape):
            got, want = tuple(full.shape), tuple(local.shape)
            raise ValueError(f"weight {name!r}: this rank's piece has shape {got}, expected {want}")
        with torch.no_grad():
            local.copy_(full)
        count += 1
    return count


def full_state_dict(model: nn.Module, bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter; see `full_state_dict_buckets`."""
    for bucket in full_state_dict_buckets(model, bucket_bytes):
        yield from bucket


def _parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Parameter]]:
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            yield name.replace(_CHECKPOINT_PREFIX, ""), module, param


def _full_tensor(module: nn.Module, param: torch.Tensor) -> torch.Tensor:
    return _gather_experts(module, param.full_tensor() if isinstance(param, DTensor) else param.detach())


def _gather_experts(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """An expert-parallel module's local experts, all-gathered over its expert group into [E, ...]."""
    if isinstance(module, ExpertParallelExperts):
        shards = [torch.empty_like(tensor) for _ in range(module.ep_size)]
        dist.all_gather(shards, tensor.contiguous(), group=module.ep_group)
        tensor = torch.cat(shards, dim=0)
    return tensor
