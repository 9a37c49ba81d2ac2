"""Weights from an HF checkpoint on disk into a running engine, checked before anything is written.

    plan = check_checkpoint(engine.model, Path("/ckpt/step-10"))   # ValueError naming what does not fit
    engine.load_weights(disk_tensors(plan), weight_version=10)

Where it sits: the HTTP front's `/update_weights_from_disk` (`leagues.serve.api_admin`) calls both; the trainer
side is `leagues.sync.disk`. The engine core owns it because it reads the model's HF name map.

Decisions:
- Every tensor name and shape is checked against the model (from the safetensors headers, reading no data),
  and the checkpoint must cover every parameter, before anything is loaded: a wrong directory fails and
  leaves the served weights untouched. Tensors a checkpoint may carry but the model does not use are skipped.
- The tensors are then read lazily, one at a time, by the generator `Engine.load_weights` consumes on the
  engine thread, so one tensor at most exists beside the model.
"""

from collections.abc import Iterator
from pathlib import Path

from safetensors import safe_open

from leagues.model.checkpoint import IGNORED, hf_name_index


def check_checkpoint(model, path: Path) -> list[tuple[Path, list[str]]]:
    """The safetensors files of `path` and the tensors to load from each, once every tensor fits a parameter
    and every parameter is covered (tensors a checkpoint may carry but the model does not use are skipped)."""
    if not path.is_dir():
        raise ValueError(f"model_path: {path} is not a directory")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model_path: no .safetensors files in {path}")
    index, params, seen, plan = hf_name_index(model), dict(model.named_parameters()), set(), []
    for file in files:
        with safe_open(file, framework="pt") as f:
            names = [n for n in f.keys() if not _unused(model, n)]  # noqa: SIM118 (safe_open has no __iter__)
            plan.append((file, names))
            for name in names:
                expected = _expected_shape(index, params, name)
                shape = tuple(f.get_slice(name).get_shape())
                if expected is None or shape != expected:
                    raise ValueError(f"model_path: tensor {name} {shape} in {file.name} fits no parameter")
                seen.add(name)
    if missing := sorted(set(index) - seen):
        raise ValueError(f"model_path: {len(missing)} tensors missing, e.g. {missing[:4]}")
    return plan


def _unused(model, name: str) -> bool:
    return bool(IGNORED.match(name)) or (model.config.tie_embeddings and name == "lm_head.weight")


def _expected_shape(index: dict, params: dict, name: str) -> tuple | None:
    if name in index:
        ours, expert, part, num_parts = index[name]
        target = params[ours] if expert is None else params[ours][expert]
        return tuple(target.chunk(num_parts, dim=0)[part].shape)
    return None


def disk_tensors(plan: list[tuple[Path, list[str]]]) -> Iterator:
    """(name, tensor) of every planned tensor, read one at a time."""
    for file, names in plan:
        with safe_open(file, framework="pt") as f:
            for name in names:
                yield name, f.get_tensor(name)
