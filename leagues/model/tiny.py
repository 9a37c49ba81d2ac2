"""The built-in tiny MoE: a Qwen3-MoE-layout checkpoint made locally, with no download.

Tests and `make run` use it. It is written once per machine into `$LEAGUES_HOME/models/` (default
`~/.cache/leagues`) as an ordinary HF checkpoint directory with its tokenizer, so every code path that
loads a real model loads this one the same way. Weights are seeded, so every machine gets the same
files. Creation goes through a temporary directory renamed into place, so concurrent callers (parallel
tests) never see a half-written model.
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch

from leagues.model.checkpoint import save_pretrained
from leagues.model.families import config_from_hf
from leagues.model.tokenizer import TINY_VOCAB_SIZE, write_tiny_tokenizer
from leagues.model.transformer import Transformer

TINY_NAME = "tiny-moe"
_VERSION = "v2"  # bump when the recipe below changes, so stale copies are rebuilt

TINY_MOE_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": None,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "dtype": "float32",
}


def leagues_home() -> Path:
    return Path(os.environ.get("LEAGUES_HOME", Path.home() / ".cache" / "leagues"))


def write_tiny_moe(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny MoE checkpoint and tokenizer into `path`."""
    path = Path(path)
    model = Transformer(config_from_hf(TINY_MOE_CONFIG))
    model.init_weights(seed=seed)
    save_pretrained(model, path, dtype=torch.float32)
    write_tiny_tokenizer(path)
    return path


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A checkpoint directory for `name_or_path`: an existing directory, or a built-in name made on demand."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if str(name_or_path) != TINY_NAME:
        raise FileNotFoundError(f"model {name_or_path!r} is neither a directory nor a built-in model ({TINY_NAME})")
    target = leagues_home() / "models" / f"{TINY_NAME}-{_VERSION}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        write_tiny_moe(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return target
