"""Sharded training checkpoints (torch.distributed.checkpoint) and their export to Hugging Face files.

The trainer saves here every few steps and `loop` resumes from `latest_checkpoint(root)`:

    save_checkpoint(root, step, model, optimizer, scheduler, extra, keep_last, parts) -> root/step-00000042
    latest_checkpoint(root)                                                    -> newest complete one, or None
    load_checkpoint(path, model, optimizer, scheduler, parts)                  -> extra
    load_latest(root, load)                  -> (path, load(path)) of the newest one that loads, or None
    export_hf(path, model, out_dir)                                            -> HF safetensors directory

A checkpoint directory holds:
    .metadata, *.distcp   model and optimizer state, written by `dcp.save` (every rank its shards), and those
                          of each further `Part` (the critic) under its name
    rank-{r}.pt           per-rank state that is no tensor shard: schedulers, python/torch/CUDA RNG, `extra`
    manifest.json         size and SHA-256 of each file above (`checkpoint_integrity.py`)
    meta.json             step and world size; written last, it marks the directory complete

Decisions:
- State dicts come from `torch.distributed.checkpoint.state_dict.get_state_dict`, so one code path
  serves plain modules and FSDP2-sharded ones, and a checkpoint saved on N ranks loads on M ranks
  (DCP reshards); `export_hf` relies on that to load a sharded checkpoint into one process.
- Atomic commit: everything is written into `step-{step:08d}.tmp/`; after a barrier rank 0 writes
  `meta.json` and renames the directory into place. A save killed at any point leaves at most a
  `.tmp` directory, which `latest_checkpoint` ignores and the next save of that step clears.
  `latest_checkpoint` also ignores final-named directories without `meta.json` or a rank file (a
  checkpoint being deleted, or a partial copy). Pruning deletes `meta.json` first for that reason.
- RNG states are saved per rank, because ranks draw different streams (dropout, sampling). Loading
  on a different world size falls back to rank 0's file, with a warning: model, optimizer, scheduler
  and `extra` are still exact, the RNG streams are not.
- `rank-{r}.pt` is read with `weights_only=True`, so `extra` must be plain data (dicts, lists,
  tuples, str, int, float, bool, None, tensors); `save_checkpoint` checks that up front rather than
  failing on resume.
- Integrity (`checkpoint_integrity.py`): a load verifies the files against the manifest, reads `.metadata`
  without unpickling anything but DCP's own classes, and refuses non-finite weights, raising `CheckpointError`;
  `load_latest` then warns and tries the checkpoint before, so a truncated or corrupted newest checkpoint costs
  the steps since the previous one, not the run. A save of non-finite weights raises before writing anything.
- A model trained beside the main one (PPO's critic) is a `Part`: its model and optimizer go into the same DCP
  save under its name (`critic.model.*`, `critic.optim.*`) and its scheduler into the rank files, so the two
  are saved and resumed together, atomically; `export_hf` reads only the main model's tensors.
- Without an initialised process group every collective is skipped (single process, tests, export).
  With one, `root` must be a filesystem every rank sees. A trainer on some of the job's ranks saves and loads
  inside `on_group(its group)`: only those ranks take part, and files and `meta.json` count ranks in the group.
"""

import contextvars
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict

from leagues.model import save_pretrained
from leagues.train.checkpoint_integrity import (
    CheckpointError,
    SafeFileSystemReader,
    count_non_finite,
    digests,
    hashed_files,
    verify,
    write_manifest,
)

_STEP_DIR = re.compile(r"step-(\d{8})")
META = "meta.json"
FORMAT_VERSION = 2  # 2: with manifest.json


_WRAPPER = "_checkpoint_wrapped_module."  # activation checkpointing's prefix, absent from state-dict names


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


_GROUP = contextvars.ContextVar("leagues_checkpoint_group", default=None)


@contextmanager
def on_group(group: dist.ProcessGroup | None) -> Iterator[None]:
    """Save and load over the ranks of `group` instead of every rank of the job (a disaggregated job's trainer
    ranks, beside engine ranks that take no part in checkpoints). Ranks are numbered within the group."""
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank(_GROUP.get()) if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size(_GROUP.get()) if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier(group=_GROUP.get())


def _dcp_io(fn, state: dict, path: Path, no_dist: bool) -> None:
    """`dcp.save` or `dcp.load` (which reads `.metadata` safely), without DCP's warning about single-process
    use (intended here). A load that fails on the files' content raises `CheckpointError`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        if fn is dcp.save:
            fn(state, checkpoint_id=path, no_dist=no_dist, process_group=_GROUP.get())
            return
        reader = SafeFileSystemReader(str(path))
        reader.read_metadata()  # a crafted or damaged `.metadata` fails here, in our words, not inside DCP
        try:
            fn(state, storage_reader=reader, no_dist=no_dist, process_group=_GROUP.get())
        except CheckpointError:
            raise
        except Exception as e:  # DCP wraps a damaged file's error in its own types
            raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:300]})") from e


@dataclass(frozen=True, slots=True)
class Part:
    """A model trained beside the main one (the critic), checkpointed with it under its name."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any | None = None


# ---------------------------------------------------------------------------------------------------
# saving


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    extra: dict | None = None,
    keep_last: int = 3,
    parts: Mapping[str, Part] | None = None,
) -> Path:
    """Save model, optimizer, scheduler, RNG states and `extra` (and every `Part` of `parts`, by name) as
    `root/step-{step:08d}`; every rank calls it.

    `keep_last` > 0 keeps that many newest checkpoints and deletes older ones; 0 keeps all.
    """
    if step < 0 or keep_last < 0:
        raise ValueError(f"save_checkpoint: step and keep_last must be >= 0, got {step} and {keep_last}")
    _check_plain(extra, "extra")
    everything = {"": Part(model, optimizer, scheduler), **(parts or {})}
    for name, part in everything.items():
        bad = count_non_finite(part.model, _distributed(), _GROUP.get())
        if bad:
            what = f"{name} model" if name else "model"
            raise CheckpointError(f"save_checkpoint: step {step}: {bad} {what} weights are NaN or inf; not saved")
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this step that was killed half-way
        tmp.mkdir(parents=True)
    _barrier()
    _dcp_io(dcp.save, _dcp_state(everything), tmp, no_dist=not _distributed())
    torch.save(_local_state(everything, extra), tmp / f"rank-{_rank()}.pt")
    _barrier()
    files = _hash_shares(tmp)
    if _rank() == 0:
        write_manifest(tmp, files)
        _commit(tmp, final, step)
        if keep_last:
            _prune(Path(root), keep_last, step)
    _barrier()
    return final


def _hash_shares(directory: Path) -> dict:
    """Every file's digest: each rank hashes its share of the files, rank 0 gets them all."""
    names = hashed_files(directory)
    mine = digests(directory, names[_rank() :: _world_size()])
    if not _distributed():
        return mine
    parts = [None] * _world_size()
    dist.all_gather_object(parts, mine, group=_GROUP.get())
    return {name: digest for part in parts for name, digest in part.items()}


def tagged_names(model: nn.Module) -> dict[str, str]:
    """State-dict name → a rank-specific name, for modules that hold this rank's own slice of a tensor.

    Expert-parallel experts are such modules (`checkpoint_tag`, e.g. "ep1of4"): every rank has
    `...experts.w13`, but each holds other experts, so DCP gets `...experts.w13.ep1of4` instead. Resuming
    needs the same expert-parallel degree; `export_hf` stitches the slices back together.
    """
    renames = {}
    for module_name, module in model.named_modules():
        tag = getattr(module, "checkpoint_tag", None)
        if tag is None:
            continue
        prefix = module_name.replace(_WRAPPER, "")
        for name, _ in module.named_parameters(recurse=False):
            fqn = f"{prefix}.{name}" if prefix else name
            renames[fqn] = f"{fqn}.{tag}"
    return renames


def _rename(model_sd: dict, optim_sd: dict, renames: dict[str, str]) -> tuple[dict, dict]:
    """Both state dicts with keys renamed (model: by FQN; optimizer: its per-FQN state and param groups)."""
    if not renames:
        return model_sd, optim_sd
    model_sd = {renames.get(k, k): v for k, v in model_sd.items()}
    optim_sd = {
        "state": {renames.get(k, k): v for k, v in optim_sd["state"].items()},
        "param_groups": [g | {"params": [renames.get(p, p) for p in g["params"]]} for g in optim_sd["param_groups"]],
    }
    return model_sd, optim_sd


def _dcp_state(parts: dict[str, Part]) -> dict:
    """What DCP saves or loads: the main part's model and optimizer at the top ("model", "optim"), each further
    part's under its name; expert-parallel slices under their rank-specific names (`tagged_names`)."""
    state = {}
    for name, part in parts.items():
        model_sd, optim_sd = _rename(*get_state_dict(part.model, part.optimizer), tagged_names(part.model))
        (state.setdefault(name, {}) if name else state).update(model=model_sd, optim=optim_sd)
    return state


def _local_state(parts: dict[str, Part], extra: dict | None) -> dict:
    state = lambda part: part.scheduler.state_dict() if part.scheduler is not None else None  # noqa: E731
    return {
        "scheduler": state(parts[""]),
        "schedulers": {name: state(part) for name, part in parts.items() if name},
        "python_rng": random.getstate(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "extra": extra,
    }


def _commit(tmp: Path, final: Path, step: int) -> None:
    """Mark `tmp` complete and rename it into place (replacing an older save of the same step)."""
    meta = {"format": FORMAT_VERSION, "step": step, "world_size": _world_size()}
    (tmp / META).write_text(json.dumps(meta) + "\n")
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        _delete(old)
    else:
        os.rename(tmp, final)


def _prune(root: Path, keep_last: int, current: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, and leftovers of older killed saves."""
    steps = sorted(_complete_steps(root))
    for step in steps[:-keep_last]:
        _delete(step_dir(root, step))
    for leftover in root.glob("step-*.tmp"):
        m = _STEP_DIR.match(leftover.name)
        if m and int(m.group(1)) < current:
            shutil.rmtree(leftover, ignore_errors=True)


def _delete(path: Path) -> None:
    (path / META).unlink(missing_ok=True)  # first: a half-deleted checkpoint is never taken for complete
    shutil.rmtree(path, ignore_errors=True)


_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(obj: Any, where: str) -> None:
    """Raise unless `obj` loads back with `torch.load(weights_only=True)`."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, f"{where} key")
            _check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise ValueError(f"save_checkpoint: {where} is a {type(obj).__name__}; extra must hold plain data only")


# ---------------------------------------------------------------------------------------------------
# finding and loading


def is_complete(path: str | Path) -> bool:
    """Whether `path` is a committed checkpoint with every file its world size needs."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    ranks = range(int(meta.get("world_size", 0)))
    return (path / ".metadata").is_file() and bool(ranks) and all((path / f"rank-{r}.pt").is_file() for r in ranks)


def _complete_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        m = _STEP_DIR.fullmatch(child.name)
        if m and child.is_dir() and is_complete(child):
            steps.append(int(m.group(1)))
    return steps


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `root`, or None (its files are not verified here:
    `load_checkpoint` does, and `load_latest` falls back when they are damaged)."""
    steps = _complete_steps(Path(root))
    return step_dir(root, max(steps)) if steps else None


def load_latest(root: str | Path, load: Callable[[Path], Any]) -> tuple[Path, Any] | None:
    """`(path, load(path))` for the newest complete checkpoint under `root` that `load` accepts; one that
    raises `CheckpointError` (damaged, unsafe, non-finite) is skipped with a warning. None: none at all.
    Raises `CheckpointError` when checkpoints exist but none loads."""
    steps = sorted(_complete_steps(Path(root)), reverse=True)
    for step in steps:
        path = step_dir(root, step)
        try:
            return path, load(path)
        except CheckpointError as e:
            warnings.warn(f"checkpoint {path} is unusable, trying the one before: {e}", stacklevel=2)
    if steps:
        raise CheckpointError(f"{root}: none of the checkpoints (steps {steps}) can be loaded; see the warnings")
    return None


def _verified(path: Path) -> None:
    if not is_complete(path):
        raise ValueError(f"{path} is not a complete checkpoint (no {META}, .metadata or rank files)")
    problem = verify(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    parts: Mapping[str, Part] | None = None,
) -> dict | None:
    """Restore model, optimizer, scheduler (and every `Part` of `parts`, saved under its name) and this rank's RNG
    states in place; returns the saved `extra`.

    Every rank calls it, with the model sharded (or not) as it will train; call it before any backward
    pass (a fresh optimizer's state is initialised from zero gradients).
    """
    path = Path(path)
    _verified(path)
    everything = {"": Part(model, optimizer, scheduler), **(parts or {})}
    state = _dcp_state(everything)
    _dcp_io(dcp.load, state, path, no_dist=not _distributed())
    for name, part in everything.items():
        loaded = state[name] if name else state
        back = {v: k for k, v in tagged_names(part.model).items()}
        model_sd, optim_sd = _rename(loaded["model"], loaded["optim"], back)
        set_state_dict(part.model, part.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        bad = count_non_finite(part.model, _distributed(), _GROUP.get())
        if bad:
            raise CheckpointError(f"{path}: {bad} loaded {name or 'model'} weights are NaN or inf")
    local = _read_local(_rank_file(path))
    schedulers = {"": local["scheduler"], **local.get("schedulers", {})}
    for name, part in everything.items():
        if part.scheduler is not None:
            if schedulers.get(name) is None:
                raise ValueError(f"{path} holds no {name or 'main'} scheduler state, but a scheduler was given")
            part.scheduler.load_state_dict(schedulers[name])
    _restore_rng(local)
    return local["extra"]


def read_extra(path: str | Path) -> dict | None:
    """The caller-provided `extra` of a checkpoint (rank 0's), without loading any tensors into a model."""
    path = Path(path)
    _verified(path)
    return _read_local(path / "rank-0.pt")["extra"]


def _read_local(file: Path) -> dict:
    try:
        return torch.load(file, weights_only=True)
    except Exception as e:  # a damaged file of a checkpoint without a manifest
        raise CheckpointError(f"{file}: cannot be read ({type(e).__name__}: {str(e)[:300]})") from e


def _rank_file(path: Path) -> Path:
    own = path / f"rank-{_rank()}.pt"
    if own.is_file():
        return own
    warnings.warn(
        f"{path} was saved on fewer ranks than rank {_rank()}: using rank 0's RNG states and extra", stacklevel=3
    )
    return path / "rank-0.pt"


def _restore_rng(local: dict) -> None:
    random.setstate(local["python_rng"])
    torch.set_rng_state(local["torch_rng"])
    if local["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(local["cuda_rng"])


# ---------------------------------------------------------------------------------------------------
# export


def _slice_keys(saved: dict, key: str) -> list[str]:
    """`key.ep{r}of{P}` entries of a checkpoint, in rank order."""
    found = [k for k in saved if k.startswith(key + ".ep") and re.fullmatch(r"ep\d+of\d+", k[len(key) + 1 :])]
    return sorted(found, key=lambda k: int(re.search(r"ep(\d+)of", k[len(key) :]).group(1)))


def export_hf(
    checkpoint_path: str | Path, model: nn.Module, out_dir: str | Path, dtype: torch.dtype | None = None
) -> Path:
    """Load the model part of a training checkpoint into a single-process `Transformer` and save it as HF files.

    `model` supplies the architecture (e.g. `load_pretrained(base)`); its weights are overwritten. Works
    for checkpoints saved on any number of ranks, sharded or not.
    """
    checkpoint_path = Path(checkpoint_path)
    _verified(checkpoint_path)
    full = get_model_state_dict(model)
    saved = SafeFileSystemReader(str(checkpoint_path)).read_metadata().state_dict_metadata
    slices = {k: _slice_keys(saved, f"model.{k}") for k in full if f"model.{k}" not in saved}
    state = {"model": {k: v for k, v in full.items() if k not in slices}}
    for key, parts in slices.items():  # expert-parallel slices: load each, then concatenate
        if not parts:
            raise ValueError(f"{checkpoint_path} has no tensor for model parameter {key!r}")
        state["model"] |= {p[len("model.") :]: torch.empty(tuple(saved[p].size), dtype=full[key].dtype) for p in parts}
    _dcp_io(dcp.load, state, checkpoint_path, no_dist=True)
    for key, parts in slices.items():
        state["model"][key] = torch.cat([state["model"].pop(p[len("model.") :]) for p in parts])
    model.load_state_dict(state["model"], strict=True)
    if count_non_finite(model, distributed=False):
        raise CheckpointError(f"{checkpoint_path}: its model weights hold NaN or inf; not exported")
    save_pretrained(model, out_dir, dtype=dtype)
    return Path(out_dir)
