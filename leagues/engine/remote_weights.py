"""Weights from a trainer by torch.distributed broadcast: the engine side of SGLang's weight-update protocol.

    receiver = WeightReceiver()
    init_weights_update_group(engine, receiver, {"master_address": "10.0.0.1", "master_port": 29600,
        "rank_offset": 1, "world_size": 2, "group_name": "weights", "backend": "nccl"})
    update_weights_from_distributed(engine, receiver, {"names": [...], "dtypes": ["bfloat16", ...],
        "shapes": [[64, 32], ...], "group_name": "weights", "weight_version": "3"})
    -> {"success": True, "message": "..."}

Where it sits: the HTTP front (`leagues.serve.api_admin`) routes `POST /init_weights_update_group` and
`POST /update_weights_from_distributed` to the two functions at the bottom; the trainer's side is
`leagues/sync/distributed.py` (rank 0, the master of the TCP store). For every bucket the trainer posts its
names, dtypes and shapes and broadcasts the tensors in the same order at the same time; the request returns
once this engine has them all.

Decisions:
- A weight group lives beside the default process group, never as it (the server process has none): a
  `TCPStore` client and a `ProcessGroupGloo`/`ProcessGroupNCCL` built directly over a `PrefixStore` named
  after the group (so groups can share a store), kept in the receiver by name. One rank per engine:
  rank = `rank_offset`. Joining blocks until every rank has joined, so callers run it off the event loop.
- A request is checked against the model before the first broadcast: names (ours or HF) that match
  nothing and shapes that do not fit. Such a request still takes part in the broadcasts, into tensors it
  drops, so the trainer never hangs and the group stays in step; it answers `success: false` and the
  weights are unchanged. Malformed requests (a missing or unknown field, lists of unequal length, an
  unknown dtype or group) raise `ValueError` before any broadcast: the server answers 400 (the trainer's
  broadcasts then find no partner; `DistributedWeightSender` fails fast and asks for a new group).
- Tensors arrive one at a time from a generator that `Engine.load_weights` consumes on the engine's loop
  thread: no step runs while the weights change, and one received tensor at most exists beside the model.
  A per-group lock keeps two requests from interleaving their broadcasts.
- `flush_cache` is accepted, but the prefix cache is always dropped: keys and values of old weights are stale.
- `weight_version` is an int or a string of one (SGLang sends strings); absent, the version goes up by one.
"""

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from leagues.engine.engine import Engine
from leagues.model import Transformer
from leagues.model.checkpoint import hf_name_index

DEFAULT_GROUP = "weight_update_group"
_REQUIRED = object()
# field: (accepted types, default or _REQUIRED), as SGLang's InitWeightsUpdateGroupReqInput and
# UpdateWeightsFromDistributedReqInput spell them
INIT_FIELDS = {
    "master_address": (str, _REQUIRED),
    "master_port": (int, _REQUIRED),
    "rank_offset": (int, _REQUIRED),
    "world_size": (int, _REQUIRED),
    "group_name": (str, DEFAULT_GROUP),
    "backend": (str, "nccl"),
}
UPDATE_FIELDS = {
    "names": (list, _REQUIRED),
    "dtypes": (list, _REQUIRED),
    "shapes": (list, _REQUIRED),
    "group_name": (str, DEFAULT_GROUP),
    "flush_cache": (bool, True),
    "weight_version": ((int, str), None),
}
DESTROY_FIELDS = {"group_name": (str, DEFAULT_GROUP)}


# --- process groups ---------------------------------------------------------------------------------


def _gloo(store: dist.Store, rank: int, size: int, timeout: timedelta) -> dist.ProcessGroup:
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _nccl(store: dist.Store, rank: int, size: int, timeout: timedelta) -> dist.ProcessGroup:
    if not hasattr(dist, "ProcessGroupNCCL") or not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA and a torch built with NCCL; use 'gloo'")
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, size, options)


BACKENDS: dict[str, Callable[[dist.Store, int, int, timedelta], dist.ProcessGroup]] = {"gloo": _gloo, "nccl": _nccl}


def new_group(store: dist.Store, group_name: str, rank: int, world_size: int, backend: str, timeout: timedelta):
    """A process group of `world_size` ranks over `store`, outside the default group; blocks until all join."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    return BACKENDS[backend](dist.PrefixStore(group_name, store), rank, world_size, timeout)


def parse_dtype(name) -> torch.dtype:
    """A dtype from "bfloat16" or "torch.bfloat16" (or a torch.dtype)."""
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtypes: {name!r} is not a torch dtype name")
    return dtype


@dataclass(slots=True)
class _Group:
    store: dist.Store
    pg: dist.ProcessGroup
    rank: int
    world_size: int
    device: torch.device
    lock: threading.Lock = field(default_factory=threading.Lock)


class WeightReceiver:
    """This engine's weight-update groups, by name; receives broadcast tensors from rank 0."""

    def __init__(self, timeout_s: float = 1800.0) -> None:
        self.timeout = timedelta(seconds=timeout_s)
        self.groups: dict[str, _Group] = {}

    def init_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = DEFAULT_GROUP,
        backend: str = "gloo",
        device: str | torch.device = "cuda",
    ) -> int:
        """Join `group_name` as rank `rank_offset` (replacing a group of that name); returns the rank."""
        if not 1 <= rank_offset < world_size:
            raise ValueError(f"rank_offset must be in 1..world_size-1 (rank 0 is the trainer), got {rank_offset}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        self.destroy_group(group_name)
        store = dist.TCPStore(master_address, master_port, world_size, is_master=False, timeout=self.timeout)
        pg = new_group(store, group_name, rank_offset, world_size, backend, self.timeout)
        device = torch.device("cpu") if backend == "gloo" else torch.device(device)
        self.groups[group_name] = _Group(store, pg, rank_offset, world_size, device)
        return rank_offset

    def group(self, group_name: str) -> _Group:
        if group_name not in self.groups:
            raise ValueError(f"group_name: no weight-update group {group_name!r} (call init_weights_update_group)")
        return self.groups[group_name]

    def receive(
        self, names: Sequence[str], dtypes: Sequence, shapes: Sequence[Sequence[int]], group_name: str = DEFAULT_GROUP
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) as each arrives from rank 0, in request order; one tensor at a time."""
        group = self.group(group_name)
        with group.lock:
            for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
                tensor = torch.empty(tuple(shape), dtype=parse_dtype(dtype), device=group.device)
                group.pg.broadcast(tensor, 0).wait()
                yield name, tensor

    def destroy_group(self, group_name: str) -> bool:
        """Leave `group_name`; False if there was none."""
        group = self.groups.pop(group_name, None)
        if group is None:
            return False
        group.pg.shutdown()
        return True


# --- checks against the model -----------------------------------------------------------------------


def _target_shape(params: dict[str, torch.Tensor], hf_index: dict, name: str) -> tuple[int, ...] | None:
    """The shape `load_named_tensors` expects for `name` (ours or HF), None if it matches nothing."""
    if name in params:
        return tuple(params[name].shape)
    if name not in hf_index:
        return None
    ours, expert, _, num_parts = hf_index[name]
    shape = list(params[ours].shape[1:] if expert is not None else params[ours].shape)
    shape[0] //= num_parts
    return tuple(shape)


def misfits(model: Transformer, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> list[str]:
    """Why these tensors would not load into `model` (unknown names, wrong shapes); empty if they would."""
    params = dict(model.named_parameters())
    hf_index = hf_name_index(model) if any(n not in params for n in names) else {}
    problems = []
    for name, shape in zip(names, shapes, strict=True):
        expected = _target_shape(params, hf_index, name)
        if expected is None:
            problems.append(f"weight {name!r} matches no parameter of family {model.config.family}")
        elif expected != tuple(shape):
            problems.append(f"weight {name!r} has shape {tuple(shape)}, expected {expected}")
    return problems


# --- the HTTP-facing functions ----------------------------------------------------------------------


def parse_fields(req: dict, spec: dict[str, tuple]) -> dict:
    """The request's fields with defaults filled in; ValueError names a missing, unknown or mistyped field."""
    if not isinstance(req, dict):
        raise ValueError("the request body must be a JSON object")
    if unknown := sorted(set(req) - set(spec)):
        raise ValueError(f"unknown field {unknown[0]!r}; fields are {sorted(spec)}")
    fields = {}
    for key, (types, default) in spec.items():
        value = req.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ValueError(f"missing field {key!r}")
            fields[key] = default
            continue
        allowed = types if isinstance(types, tuple) else (types,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ValueError(f"field {key!r} must be {'/'.join(t.__name__ for t in allowed)}, got {value!r}")
        fields[key] = value
    return fields


def _parse_tensor_lists(fields: dict) -> tuple[list[str], list[torch.dtype], list[tuple[int, ...]]]:
    names, dtypes, shapes = fields["names"], fields["dtypes"], fields["shapes"]
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names, dtypes and shapes differ in length: {len(names)}, {len(dtypes)}, {len(shapes)}")
    if not all(isinstance(n, str) for n in names):
        raise ValueError("names: every name must be a string")
    for shape in shapes:
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise ValueError(f"shapes: {shape!r} is not a list of ints")
        if any(d < 0 for d in shape):
            raise ValueError(f"shapes: {shape!r} has a negative dimension")
    return names, [parse_dtype(d) for d in dtypes], [tuple(s) for s in shapes]


def _parse_version(version: int | str | None) -> int | None:
    if isinstance(version, str):
        try:
            return int(version)
        except ValueError:
            raise ValueError(f"weight_version must be an integer (or a string of one), got {version!r}") from None
    return version


def init_weights_update_group(engine: Engine, receiver: WeightReceiver, req: dict) -> dict:
    """`POST /init_weights_update_group`: join the trainer's group; blocks until every rank has joined."""
    f = parse_fields(req, INIT_FIELDS)
    args = dict(f, device=engine.runner.device)
    try:
        rank = receiver.init_group(**args)
    except RuntimeError as err:  # store or rendezvous failures (DistError is a RuntimeError)
        return {"success": False, "message": f"failed to join group {f['group_name']!r}: {err}"}
    return {"success": True, "message": f"joined group {f['group_name']!r} as rank {rank} of {f['world_size']}"}


def update_weights_from_distributed(engine: Engine, receiver: WeightReceiver, req: dict) -> dict:
    """`POST /update_weights_from_distributed`: receive one bucket from rank 0 and load it in place."""
    fields = parse_fields(req, UPDATE_FIELDS)
    names, dtypes, shapes = _parse_tensor_lists(fields)
    version = _parse_version(fields["weight_version"])
    receiver.group(fields["group_name"])  # an unknown group fails before any broadcast
    stream = receiver.receive(names, dtypes, shapes, fields["group_name"])
    try:
        if problems := misfits(engine.model, names, shapes):
            for _ in stream:  # take part in the broadcasts, keep nothing: the trainer does not hang
                pass
            more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
            return {"success": False, "message": "; ".join(problems[:4]) + more + "; weights unchanged"}
        engine.load_weights(stream, version)
    except (RuntimeError, ValueError) as err:
        return {"success": False, "message": f"weight update failed: {err}"}
    return {"success": True, "message": f"loaded {len(names)} tensors; weight version {engine.weight_version}"}


def destroy_weights_update_group(engine: Engine, receiver: WeightReceiver, req: dict) -> dict:
    """`POST /destroy_weights_update_group` (SGLang's third route): leave the group."""
    name = parse_fields(req, DESTROY_FIELDS)["group_name"]
    if not receiver.destroy_group(name):
        return {"success": False, "message": f"no weight-update group {name!r}"}
    return {"success": True, "message": f"left group {name!r}"}
