"""Expert-parallel engines: each engine of a group keeps 1/P of every MoE layer's experts and its own requests.

Tokens visit the experts' ranks by all-to-all inside the forward (`leagues.parallel.apply_ep`), so every
forward is collective and the group's engine threads step in lockstep: each loop turn, one small all-reduce
on a CPU group tells every engine whether any of them has work and whether all have closed; an engine with
nothing of its own to run then runs a forward of no tokens, serving its experts to the others (also while
asleep: its weights stay, only its cache goes). A step that raises leaves its peers inside an exchange this
engine will never join, so the engine stops for good (`Lockstep.turn` records the failure).

Weight loads take full `[E, ...]` expert tensors by our names and keep this rank's slice.
"""

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from leagues.model import Transformer
from leagues.model.checkpoint import read_config, read_parameters, reset_buffers
from leagues.parallel import ExpertParallelExperts, apply_ep


def is_split(ep_group) -> bool:
    """Whether a group splits the experts at all (a group of one keeps them whole)."""
    return ep_group is not None and dist.get_world_size(ep_group) > 1


def load_expert_parallel(path: Path, dtype: torch.dtype, device: torch.device, ep_group) -> Transformer:
    """A model holding only this rank's experts, read from the checkpoint without the others ever loading."""
    with torch.device("meta"):
        model = Transformer(read_config(path))
    apply_ep(model, DeviceMesh.from_group(ep_group, device.type))
    per_rank = model.config.num_experts // dist.get_world_size(ep_group)
    lo = dist.get_rank(ep_group) * per_rank
    state = {n: t.to(device=device, dtype=dtype) for n, t in read_parameters(path, (lo, lo + per_rank))}
    model.load_state_dict(state, assign=True, strict=True)
    reset_buffers(model, device)
    return model


class Lockstep:
    """The expert split of one engine's model and its group's lockstep turns."""

    def __init__(self, model: Transformer, ep_group, control_group=None) -> None:
        self.group, self.control_group = ep_group, control_group or ep_group
        apply_ep(model, DeviceMesh.from_group(ep_group, model.embed.weight.device.type))
        rank = dist.get_rank(ep_group)
        self.slices: dict[str, tuple[int, int, int]] = {}
        for name, module in model.named_modules():
            if isinstance(module, ExpertParallelExperts):
                lo = rank * module.num_local
                for param in ("w13", "w2"):
                    self.slices[f"{name}.{param}"] = (lo, lo + module.num_local, module.num_experts)

    def local(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        """A full expert tensor (our names) cut to this rank's slice; other weights pass through."""
        if name in self.slices:
            lo, hi, total = self.slices[name]
            return name, tensor[lo:hi] if tensor.shape[0] == total else tensor
        if ".experts." in name:
            raise ValueError(f"weight {name!r}: an expert-parallel engine loads experts by our names (w13, w2)")
        return name, tensor

    def turn(self, engine) -> bool:
        """One lockstep turn of `engine`; False once every peer has closed and none has work, or once this
        engine's step failed (then `engine.failure` holds the error and every waiting caller has it)."""
        mine = not engine.asleep and engine.scheduler.has_work()
        flags = torch.tensor([int(mine), int(not engine.closed)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control_group)
        busy, open_peers = bool(flags[0]), bool(flags[1])
        if not busy:
            if not open_peers:
                return False
            engine.idle(timeout=0.005)
            return True
        try:
            if not (mine and engine.step()):
                engine.runner.execute_empty()  # our peers' tokens still visit our experts
        except Exception as err:  # the lockstep is broken: stop, and fail every waiting caller
            engine.failure = err
            engine.fail_all(err)
            return False
        return True
