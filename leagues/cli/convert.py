"""`leagues convert`: read a checkpoint with leagues' loader and write it back in HF format.

Where it sits: the round trip through `leagues.model`'s checkpoint IO (name maps per family), used to
change a checkpoint's dtype and to check that leagues reads and writes a family faithfully. Tokenizer
and generation files are copied unchanged, so the output directory is a complete HF checkpoint.

Decisions:
- The whole model is loaded on the CPU: conversion is IO-bound and must work on machines without a GPU.
- The output directory must not be the input directory, so a failed write cannot destroy the source.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from leagues.cli import UsageError
from leagues.cli.generate import Dtype, resolve_model_dir

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


@dataclass(kw_only=True, slots=True)
class ConvertConfig:
    """Source checkpoint, destination directory, dtype."""

    model: str = ""
    """Source checkpoint directory in HF format, or the name of a built-in model (`tiny-moe`)."""
    out: str = ""
    """Destination directory; created if missing, files in it are overwritten."""
    dtype: Dtype = "float32"
    """Dtype of the written weights."""
    checkpoint: str | None = None
    """A training checkpoint (`step-*` directory written by the trainer) whose weights replace the model's;
    `model` then only gives the architecture and the tokenizer."""


def run_convert(cfg: ConvertConfig) -> int:
    """The `leagues convert` verb."""
    import torch

    from leagues.model import load_pretrained, save_pretrained

    if not cfg.model or not cfg.out:
        raise UsageError("convert needs --model SRC and --out DST")
    src, dst = resolve_model_dir(cfg.model), Path(cfg.out)
    if dst.resolve() == src.resolve():
        raise UsageError(f"--out must differ from the source checkpoint ({src})")
    model = load_pretrained(src, dtype=getattr(torch, cfg.dtype), device="cpu")
    dst.mkdir(parents=True, exist_ok=True)
    if cfg.checkpoint:
        from leagues.train.checkpoint import export_hf

        try:
            export_hf(cfg.checkpoint, model, dst, dtype=getattr(torch, cfg.dtype))
        except ValueError as e:
            raise UsageError(str(e)) from None
    else:
        save_pretrained(model, dst)
    copied = copy_tokenizer_files(src, dst)
    print(f"wrote {dst} ({cfg.dtype}; copied {', '.join(copied) or 'no tokenizer files'})", file=sys.stderr)
    return 0


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer and generation files present in `src`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
