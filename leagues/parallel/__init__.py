"""Parallelism applied to the single-device model from outside: device mesh, FSDP2, expert parallel.

Public API:
    ParallelConfig, ParallelMesh
    build_mesh(cfg, world_size, device_type, ranks=None) -> ParallelMesh   (None on a rank outside `ranks`)
    apply_ep(model, ep_mesh)                       experts split over the `ep` axis, all-to-all dispatch
    apply_activation_checkpointing(model)
    apply_fsdp(model, mesh, cfg, device_type)      FSDP2 per expert module, per block, at the root
    apply_compute_copies(model, dtype)             one rank: float32 masters, compute-dtype copies for the passes
    compute_weights(model) / refresh(model)        the passes on the copies / the copies cast again after a step
    compute_copies(model)                          the model's copies (None without), for an optimizer that writes them
    parallelize(model, cfg, world_size, device_type) -> ParallelMesh   all of the above, in order (no FSDP on one rank)
    full_state_dict(model) / full_state_dict_buckets(model)   full tensors back out, by our names
    unit_buckets(model)                         the same in the compute dtype, one FSDP unit at a time
    whole_parameters(model)                     on one rank: the parameters themselves, no gather
    load_full_tensors(model, named)             the inverse: each rank keeps its pieces of full tensors
    set_last_microbatch(model, cfg, last)       gradient accumulation across micro-batches
    ExpertParallelExperts                          the experts module with dispatch() / combine()
    trainer_memory(config, cfg, world) / format_plan(plan)   what a rank will hold, before building anything
    frozen_memory(config, cfg, world)           the same for a frozen model (KL reference, distillation teacher)
    reshard(model)                              free every FSDP unit's gathered parameters (after a no-grad pass)
"""

from leagues.parallel.compute import apply_compute_copies, compute_copies, compute_weights, refresh
from leagues.parallel.expert_parallel import ExpertParallelExperts, apply_ep
from leagues.parallel.fsdp import (
    apply_activation_checkpointing,
    apply_fsdp,
    full_state_dict,
    full_state_dict_buckets,
    load_full_tensors,
    parallelize,
    reshard,
    set_last_microbatch,
    unit_buckets,
    whole_parameters,
)
from leagues.parallel.memory import activation_bytes, format_plan, frozen_memory, trainer_memory
from leagues.parallel.mesh import ParallelConfig, ParallelMesh, build_mesh

__all__ = [
    "ExpertParallelExperts",
    "ParallelConfig",
    "ParallelMesh",
    "apply_activation_checkpointing",
    "apply_compute_copies",
    "compute_copies",
    "compute_weights",
    "apply_ep",
    "apply_fsdp",
    "build_mesh",
    "format_plan",
    "frozen_memory",
    "full_state_dict",
    "full_state_dict_buckets",
    "load_full_tensors",
    "parallelize",
    "refresh",
    "reshard",
    "set_last_microbatch",
    "trainer_memory",
    "activation_bytes",
    "unit_buckets",
    "whole_parameters",
]
