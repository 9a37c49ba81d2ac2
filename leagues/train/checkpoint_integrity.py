"""Checkpoint integrity: a checksum manifest written with every checkpoint, its verification, a `.metadata`
reader that unpickles only what DCP writes, and the finite-weights check.

Where it sits: `checkpoint.py` calls these while saving (`write_manifest` before the commit mark) and
loading (`verify`, `SafeFileSystemReader`, `count_non_finite`); `load_latest` skips a
damaged newest checkpoint (any `CheckpointError`) and falls back to the one before, with a warning.

    manifest.json   {"format": 1, "files": {name: {"size": bytes, "sha256": hex}}}  every file but the marks

Decisions:
- SHA-256 over every file of the directory (shards, `.metadata`, rank files). On save the files are split over
  the ranks, each hashes its share and rank 0 writes the manifest (through a temp file and `os.replace`) before
  `meta.json`; a file's hashes run on a thread pool (hashlib releases the GIL), so verification reads the disk
  at close to its speed. A checkpoint without a manifest (written before manifests existed) is accepted as is.
- DCP stores its `.metadata` as a pickle, and `pickle.load` runs whatever a crafted file names. The reader here
  resolves only the classes DCP's metadata is made of (its dataclasses, `torch.Size`, dtypes, layouts, paths);
  any other global fails the load with `CheckpointError`, before anything runs.
- Non-finite weights are refused at load (the checkpoint is damaged, or trained into NaN) and at save (a NaN
  checkpoint would be resumed from); with a process group the ranks agree, so all of them raise together.
"""

import hashlib
import io
import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

MANIFEST = "manifest.json"
_UNHASHED = {"meta.json", MANIFEST}  # the marks written after the manifest
_CHUNK = 8 * 2**20


class CheckpointError(ValueError):
    """A checkpoint that must not be used: damaged, unsafe to read, or holding non-finite weights."""


# ---------------------------------------------------------------------------------------------------
# checksums


def file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def hashed_files(directory: Path) -> list[str]:
    """The names of the files a manifest covers, sorted."""
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in _UNHASHED)


def digests(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(len(names), 1))) as pool:
        return dict(zip(names, pool.map(lambda n: file_digest(directory / n), names), strict=True))


def write_manifest(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": 1, "files": files}, sort_keys=True) + "\n")
    os.replace(tmp, directory / MANIFEST)


def verify(directory: str | Path) -> str | None:
    """What is wrong with the checkpoint's files against its manifest (None: nothing, or no manifest)."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        return None
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    missing = [n for n in files if not (directory / n).is_file()]
    if missing:
        return f"{missing[0]} is missing"
    short = [n for n, want in files.items() if (directory / n).stat().st_size != want["size"]]
    if short:
        got, want = (directory / short[0]).stat().st_size, files[short[0]]["size"]
        return f"{short[0]} has {got} bytes, the manifest says {want} (truncated or rewritten)"
    for name, got in digests(directory, sorted(files)).items():
        if got["sha256"] != files[name]["sha256"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


# ---------------------------------------------------------------------------------------------------
# reading DCP's metadata without running code


_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _ALLOWED_MODULES and not name.startswith("__"):
            found = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(found, type):  # a class of DCP's metadata, not a function of those modules
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.memory_format):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def load_metadata(data: bytes, where: str) -> Any:
    try:
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # a crafted or damaged pickle: any error means the file cannot be used
        raise CheckpointError(f"{where}: not a checkpoint metadata file ({type(e).__name__}: {e})") from None


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, with `.metadata` read by the restricted unpickler above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_metadata(f.read(), str(path))
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---------------------------------------------------------------------------------------------------
# finite weights


def count_non_finite(model: torch.nn.Module, distributed: bool, group: dist.ProcessGroup | None = None) -> int:
    """Non-finite parameter entries of `model` (this rank's shards; summed over the ranks of `group`, None: every
    rank of the job, when `distributed`)."""
    bad = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        bad += int((~torch.isfinite(local.detach())).sum())
    if distributed:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        total = torch.tensor([bad], dtype=torch.long, device=device)
        dist.all_reduce(total, group=group)
        bad = int(total)
    return bad
