"""Hugging Face checkpoint IO: `load_pretrained` and `save_pretrained`.

A checkpoint directory is used as-is: `config.json` plus `model.safetensors` or a sharded
`model.safetensors.index.json`. The family's weight table (`families.py`) says which HF tensors make
each of our parameters; loading builds the model on the meta device and assigns tensors one by one
(no random init, no second copy), and saving splits them back into the same HF names, so
HF → leagues → HF is bit-exact. Writes go to a temporary file renamed into place.
"""

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from leagues.model.config import ModelConfig
from leagues.model.families import FAMILIES, HF, config_from_hf
from leagues.model.moe import Router
from leagues.model.transformer import Transformer

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^layers\.(\d+)\.")
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def read_config(path: str | Path) -> ModelConfig:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json in model directory {path}")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path}:{err.lineno}: invalid JSON: {err.msg}") from None
    return config_from_hf(hf_cfg, where=str(cfg_path))


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name → the safetensors file that holds it."""
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        return {name: path / fname for name, fname in weight_map.items()}
    if (path / SINGLE).is_file():
        with safe_open(path / SINGLE, framework="pt") as f:
            return dict.fromkeys(f.keys(), path / SINGLE)
    raise FileNotFoundError(f"no {SINGLE} or {INDEX} in model directory {path}")


def hf_names(ours: str, spec: HF, num_experts: int) -> list[list[str]]:
    """HF names for one parameter: a list per expert (one list when not per expert), each to concatenate."""
    m = _LAYER.match(ours)
    layer = m.group(1) if m else ""
    experts = range(num_experts) if spec.per_expert else [None]
    return [[n.format(i=layer, e=e) for n in spec.names] for e in experts]


def _table_key(ours: str) -> str:
    return _LAYER.sub("layers.{i}.", ours)


def parameter_map(model: Transformer) -> Iterator[tuple[str, torch.Tensor, HF, list[list[str]]]]:
    """(our name, parameter, table entry, HF names) for every parameter of the model."""
    table = FAMILIES[model.config.family].weights
    for ours, param in model.named_parameters():
        key = _table_key(ours)
        if key not in table:
            raise KeyError(f"family {model.config.family} has no HF name for parameter {ours}")
        yield ours, param, table[key], hf_names(ours, table[key], model.config.num_experts)


class _Reader:
    """Opens each shard once and hands out tensors by HF name."""

    def __init__(self, path: Path) -> None:
        self.files = _weight_files(path)
        self.handles: dict[Path, object] = {}
        self.used: set[str] = set()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = safe_open(file, framework="pt")
        self.used.add(name)
        return self.handles[file].get_tensor(name)

    def unused(self) -> list[str]:
        return sorted(n for n in self.files if n not in self.used and not IGNORED.match(n))


def _assemble(reader: _Reader, names: list[list[str]], per_expert: bool, shape: torch.Size, what: str) -> torch.Tensor:
    """One parameter from its HF tensors, each checked against its share of `shape` before cat/stack."""
    part_shape = list(shape[1:] if per_expert else shape)
    part_shape[0] //= len(names[0])
    groups = [[reader.get(n) for n in group] for group in names]
    for group_names, group in zip(names, groups, strict=True):
        for name, tensor in zip(group_names, group, strict=True):
            if list(tensor.shape) != part_shape:
                raise ValueError(
                    f"{what}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(part_shape)}"
                    f" (parameter shape {tuple(shape)})"
                )
    parts = [torch.cat(group, dim=0) for group in groups]
    return torch.stack(parts) if per_expert else parts[0]


def read_parameters(path: str | Path, experts: tuple[int, int] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of the HF checkpoint at `path` under our name, assembled on the CPU in the checkpoint's
    dtype, one at a time (a sharded trainer keeps only its pieces of each). `experts=(lo, hi)`: of the stacked
    expert weights read only experts lo..hi-1 (an expert-parallel rank's)."""
    path = Path(path)
    cfg = read_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    reader = _Reader(path)
    if cfg.tie_embeddings:
        reader.used.add("lm_head.weight")  # some tied checkpoints still carry the copy
    for ours, param, spec, names in parameter_map(model):
        shape = param.shape
        if spec.per_expert and experts is not None:
            reader.used.update(n for group in names[: experts[0]] + names[experts[1] :] for n in group)
            names, shape = names[experts[0] : experts[1]], torch.Size([experts[1] - experts[0], *shape[1:]])
        yield ours, _assemble(reader, names, spec.per_expert, shape, f"{path}: {ours}")
    if extra := reader.unused():
        raise ValueError(f"{path}: checkpoint tensors not used by family {cfg.family}: {extra[:8]}")


def reset_buffers(model: Transformer, device: str | torch.device) -> None:
    """Recompute the non-persistent buffers (rotary table, zero expert biases) of a model whose storage was
    built on the meta device."""
    model.rope.reset(device)
    for module in model.modules():
        if isinstance(module, Router):
            module.expert_bias = torch.zeros(module.expert_bias.shape, device=device)


def load_pretrained(
    path: str | Path, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """Load an HF checkpoint directory as a `Transformer` (dtype None keeps the checkpoint's)."""
    with torch.device("meta"):
        model = Transformer(read_config(path))
    state = {ours: t.to(device=device, dtype=dtype or t.dtype) for ours, t in read_parameters(path)}
    model.load_state_dict(state, assign=True, strict=True)
    reset_buffers(model, device)
    return model


def _hf_tensors(model: Transformer, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Split every parameter back into the HF tensors it was made from."""
    for _, param, spec, names in parameter_map(model):
        data = param.detach().to(dtype=dtype or param.dtype, device="cpu")
        per_group = data.unbind(0) if spec.per_expert else [data]
        for group_names, tensor in zip(names, per_group, strict=True):
            for name, part in zip(group_names, tensor.chunk(len(group_names), dim=0), strict=True):
                yield name, part.contiguous()


def _atomic_save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    tmp = file.with_name(file.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, file)


def _shard(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_pretrained(
    model: Transformer, path: str | Path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Write the model as an HF checkpoint directory (config.json + safetensors, sharded when large)."""
    if not model.config.hf_config:
        raise ValueError(
            "model.config.hf_config is empty: build configs with config_from_hf so config.json can be written"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = dict(_hf_tensors(model, dtype))
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        _atomic_save(shards[0], path / SINGLE)
        names = [SINGLE]
    else:
        names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        for shard, fname in zip(shards, names, strict=True):
            _atomic_save(shard, path / fname)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {n: f for s, f in zip(shards, names, strict=True) for n in s},
        }
        _atomic_write_text(path / INDEX, json.dumps(index, indent=2))
    _remove_stale_weights(path, keep=set(names))
    config = dict(model.config.hf_config)
    if tensors:  # config.json names the dtype the weights were written in
        written = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = written
    _atomic_write_text(path / "config.json", json.dumps(config, indent=2) + "\n")


def _remove_stale_weights(path: Path, keep: set[str]) -> None:
    """Drop weight files of an earlier save in another layout: a stale index would otherwise win on load."""
    if SINGLE in keep:
        (path / INDEX).unlink(missing_ok=True)  # first, so the directory never points at missing shards
    for file in [path / SINGLE, *path.glob("model-*-of-*.safetensors")]:
        if file.name not in keep and _WEIGHT_FILE.fullmatch(file.name):
            file.unlink(missing_ok=True)


def _atomic_write_text(file: Path, text: str) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, file)


def hf_name_index(model: Transformer) -> dict[str, tuple[str, int | None, int, int]]:
    """HF tensor name → (our parameter, expert index or None, part index, number of parts along dim 0)."""
    index = {}
    for ours, _, spec, names in parameter_map(model):
        for expert, group in enumerate(names):
            for part, name in enumerate(group):
                index[name] = (ours, expert if spec.per_expert else None, part, len(group))
    return index


def weight_targets(model: Transformer) -> dict[str, torch.Tensor]:
    """What `load_named_tensors` may write, by our names: every parameter and the routers' `expert_bias`."""
    return dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if n.endswith("expert_bias")}


@torch.no_grad()
def load_named_tensors(
    model: Transformer, named_tensors, targets: dict[str, torch.Tensor] | None = None, flush_bytes: int = 256 << 20
) -> int:
    """Copy tensors into the model in place, by our parameter names (or routers' `expert_bias` buffers) or by HF
    names; returns the count. `targets`: `weight_targets(model)`, kept by a caller that loads often (walking the
    modules costs about half a millisecond a call).

    In place, so no second copy of the model is made and captured CUDA graphs stay valid. A name that maps to
    nothing, or a shape that does not fit, raises. Copies go by `_foreach_copy_` (casting to the model's dtype
    as they go), one launch per `flush_bytes` of sources rather than one per tensor; a lazy stream (tensors read
    from disk) is held at most that much at a time.
    """
    params = targets if targets is not None else weight_targets(model)
    hf_index = None
    dst, src, held, count = [], [], 0, 0
    for name, tensor in named_tensors:
        if name in params:
            target = params[name]
        else:
            hf_index = hf_index if hf_index is not None else hf_name_index(model)
            if name not in hf_index:
                raise ValueError(f"weight {name!r} matches no parameter of family {model.config.family}")
            ours, expert, part, num_parts = hf_index[name]
            target = params[ours] if expert is None else params[ours][expert]
            target = target.chunk(num_parts, dim=0)[part]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        dst.append(target)
        src.append(tensor)
        held += tensor.nbytes
        count += 1
        if held >= flush_bytes:
            torch._foreach_copy_(dst, src)
            dst, src, held = [], [], 0
    if dst:
        torch._foreach_copy_(dst, src)
    return count
