"""Weights from the trainer to engines of the same job: in place (colocated) and by broadcast (disaggregated).

    push_in_place(trainer.state_dict_for_sync(), engine, version)          # colocated: same rank
    sender = BroadcastSync(group, src=0); sender.send(buckets, version)    # disaggregated: trainer rank 0
    BroadcastSync(group, src=0).receive(engine)                            # ... and on every engine rank

Where it sits: the RL loop's last stage. The trainer yields full (unsharded) weights in buckets (gathered
from FSDP2/EP shards one bucket at a time); these functions land them in the engine's own model, by the
model's parameter names, and stamp the new version on every later output.

Decisions:
- Colocated: each bucket is copied into the engine's parameters and dropped, so only one bucket of full
  tensors exists beside the two resident models (trainer shards, engine weights) at any time. A trainer of
  one rank hands over one bucket of its compute copies themselves (the forward's bf16 weights, no cast): one
  engine call, a few `_foreach_copy_`.
- Disaggregated: one broadcast group holds the sending trainer rank and every engine rank. Each bucket
  travels as a small header (names, shapes, dtypes; a pickled object broadcast) and then one flat tensor
  per dtype, so a bucket is a handful of collectives, not one per parameter; an empty header ends the
  transfer. On NCCL the flat tensors travel on the GPU; headers always go through the group's object path.
"""

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

Bucket = Sequence[tuple[str, torch.Tensor]]


def push_in_place(buckets: Iterable[Bucket], engine, version: int) -> int:
    """Load every bucket into `engine` (same process), one engine call a bucket; returns the bytes written
    into the engine (in its dtype: a bucket of float32 masters cast on the way counts what lands)."""
    itemsize = engine.model.embed.weight.element_size()
    moved = 0
    for bucket in buckets:
        bucket = list(bucket)
        engine.load_weights(bucket, version=version)
        moved += sum(t.numel() for _, t in bucket) * itemsize
    return moved


class BroadcastSync:
    """Bucketed broadcast of weights from rank `src` to the other ranks of `group` (global ranks)."""

    def __init__(self, group: dist.ProcessGroup, src: int, device: torch.device | str = "cpu") -> None:
        self.group, self.src, self.device = group, src, torch.device(device)

    def send(self, buckets: Iterable[Bucket], version: int) -> int:
        moved = 0
        for bucket in buckets:
            header = [(name, tuple(t.shape), t.dtype) for name, t in bucket]
            self._header({"version": version, "tensors": header})
            for flat in self._flat(bucket):
                dist.broadcast(flat, self.src, group=self.group)
                moved += flat.numel() * flat.element_size()
        self._header({"version": version, "tensors": []})
        return moved

    def receive(self, engine) -> int:
        """Receive one whole transfer into `engine`; returns the version it carried."""
        while True:
            header = self._header(None)
            if not header["tensors"]:
                return header["version"]
            bucket = []
            for dtype, entries in _by_dtype(header["tensors"]).items():
                flat = torch.empty(sum(_numel(shape) for _, shape in entries), dtype=dtype, device=self.device)
                dist.broadcast(flat, self.src, group=self.group)
                for (name, shape), part in zip(entries, flat.split([_numel(s) for _, s in entries]), strict=True):
                    bucket.append((name, part.view(shape)))
            engine.load_weights(bucket, version=header["version"])

    def _header(self, header: dict | None) -> dict:
        box = [header]
        dist.broadcast_object_list(box, self.src, group=self.group)
        return box[0]

    def _flat(self, bucket: Bucket) -> list[torch.Tensor]:
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for _, t in bucket:
            groups.setdefault(t.dtype, []).append(t.detach().reshape(-1).to(self.device))
        return [torch.cat(parts) for parts in groups.values()]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _by_dtype(entries: list[tuple[str, tuple, torch.dtype]]) -> dict[torch.dtype, list[tuple[str, tuple]]]:
    """Header entries grouped by dtype, in first-seen order (the sender's `_flat` order)."""
    groups: dict[torch.dtype, list[tuple[str, tuple]]] = {}
    for name, shape, dtype in entries:
        groups.setdefault(dtype, []).append((name, shape))
    return groups
