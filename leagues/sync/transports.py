"""How an RL run moves its trainer's weights to its engines each step: one `WeightSync`, chosen once by name.

    sync = WEIGHT_SYNCS[name].from_run(run)    # in_place, broadcast, distributed, disk or none
    metrics = sync.push(trainer, version)       # every trainer rank calls it after each step
    version = sync.receive(engine)              # broadcast: what an engine rank of the same job calls

Where it sits: the loop builds the transport when the run is built (every rank of the job, in the same order,
since some make process groups) and calls `push` after every training step. `from_run` reads only what a run
has (`engine`, `rank`, `world`, `trainer_ranks` for the broadcast, `weight_sender()`, `write_weights()`,
`update_engines()`), so this package imports nothing of the loop (nor of the fleet that `update_engines` goes
through).

- in_place: the colocated engine of this rank; buckets gathered in the engine's dtype, copied in place.
- broadcast: disaggregated runs, the trainer ranks training and the other ranks' engines receiving inside the same
  job (`BroadcastSync`: bucketed, NCCL on GPUs, gloo on CPUs). Every trainer rank gathers the full weights (the
  gathers are collective), the first one broadcasts them to a group of itself and the engine ranks.
- distributed: SGLang's weight-update group to the external engines the run's fleet says should serve (rank 0
  sends; the other trainer ranks still gather, since the gathers are collective). The group follows the fleet:
  dead engines are left out, restarted ones join a new group and catch up (`DistributedWeightSender.send_to`).
- disk: an HF checkpoint written to a shared disk, then `update_weights_from_disk` on every engine the run's
  fleet says should serve (quarantined ones are skipped, restarted ones catch up; `leagues.serve.fleet`).
- none: frozen engines (evaluation of a fixed policy, or engines updated by other means).

Both external transports go through the run's `update_engines(send, version)`: it asks the fleet for the engines
that are to serve `version` (`WeightTarget`s, with the run's key), calls `send(targets)` and gives the failures
back to the fleet, which quarantines those engines and serves `version` from then on.
"""

import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import torch
import torch.distributed as dist

from leagues.sync.disk import load_on
from leagues.sync.local import BroadcastSync, push_in_place


class WeightSync(Protocol):
    def push(self, trainer, version: int) -> dict[str, float]:
        """Send the trainer's current weights as `version`; returns metrics (`sync/...`)."""
        ...


WEIGHT_SYNCS: dict[str, Any] = {}


def register(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        WEIGHT_SYNCS[name] = cls
        return cls

    return add


@register("in_place")
class InPlaceSync:
    def __init__(self, engine) -> None:
        self.engine = engine

    @classmethod
    def from_run(cls, run) -> "InPlaceSync":
        return cls(run.engine)

    def push(self, trainer, version: int) -> dict[str, float]:
        start = time.perf_counter()
        dtype = self.engine.model.embed.weight.dtype  # gathered in the engine's dtype when the trainer computes in it
        moved = push_in_place(trainer.state_dict_for_sync(dtype=dtype), self.engine, version=version)
        seconds = time.perf_counter() - start
        return {"sync/gb": moved / 1e9, "sync/gb_per_s": moved / 1e9 / seconds if seconds else 0.0}


@register("broadcast")
class BroadcastPush:
    def __init__(self, sync: BroadcastSync, sends: bool = True) -> None:
        self.sync, self.sends = sync, sends
        """`sends`: this trainer rank broadcasts (the first one); the others only take part in the gathers."""

    @classmethod
    def from_run(cls, run) -> "BroadcastPush":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        src = run.trainer_ranks[0]
        members = [src] + [r for r in range(run.world) if r not in run.trainer_ranks]
        return cls(BroadcastSync(dist.new_group(members), src=src, device=device), sends=run.rank == src)

    def push(self, trainer, version: int) -> dict[str, float]:
        buckets = trainer.state_dict_for_sync()
        if not self.sends:
            for _ in buckets:  # the other trainer ranks' part of each gather
                pass
            return {}
        start = time.perf_counter()
        moved = self.sync.send(buckets, version=version)
        seconds = time.perf_counter() - start
        return {"sync/gb": moved / 1e9, "sync/gb_per_s": moved / 1e9 / seconds if seconds else 0.0}

    def receive(self, engine) -> int:
        """On an engine rank: take one whole transfer into `engine`; returns its version."""
        return self.sync.receive(engine)


@register("distributed")
class DistributedSync:
    def __init__(self, sender: Callable[[], Any], update: Callable[..., dict[str, float]], rank: int) -> None:
        self.sender, self.update, self.rank = sender, update, rank
        """`sender()`: the `DistributedWeightSender`, made on first use (rank 0 only). `update(send, version)`:
        calls `send(targets)` with the engines that are to serve `version` (the run's fleet) and records its
        failures; its metrics."""

    @classmethod
    def from_run(cls, run) -> "DistributedSync":
        return cls(run.weight_sender, run.update_engines, run.rank)

    def push(self, trainer, version: int) -> dict[str, float]:
        buckets = trainer.state_dict_for_sync()  # every trainer rank gathers; rank 0 sends
        try:
            if self.rank == 0:
                return self.update(lambda targets: self.sender().send_to(targets, buckets, version), version)
        finally:
            for _ in buckets:  # the other ranks' part of each gather (on rank 0: whatever a failure left)
                pass
        return {}


@register("disk")
class DiskSync:
    def __init__(self, write: Callable[[Any], Any], update: Callable[..., dict[str, float]], rank: int) -> None:
        self.write, self.update, self.rank = write, update, rank
        """`write(trainer)`: the path of an HF checkpoint of the trainer's weights, on a disk the engines read.
        `update(send, version)`: calls `send(targets)` with the engines that are to serve `version` (the run's
        fleet) and records its failures; its metrics."""

    @classmethod
    def from_run(cls, run) -> "DiskSync":
        return cls(run.write_weights, run.update_engines, run.rank)

    def push(self, trainer, version: int) -> dict[str, float]:
        path = self.write(trainer)
        metrics = {}
        if self.rank == 0:
            metrics = self.update(partial(load_on, path=path.resolve(), version=version), version)
        if dist.is_initialized():
            dist.barrier()
        return metrics


@register("none")
class FrozenSync:
    @classmethod
    def from_run(cls, run) -> "FrozenSync":
        return cls()

    def push(self, trainer, version: int) -> dict[str, float]:
        return {}
