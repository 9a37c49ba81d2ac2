"""The single-device transformer shared by the rollout engine and the trainer.

Public API:
    load_pretrained(path, dtype=torch.float32, device="cpu") -> Transformer
    save_pretrained(model, path, dtype=None)
    load_tokenizer(path)
    resolve_model_path("tiny-moe" | directory)
    Transformer, ModelConfig, ForwardBatch, ForwardOutput, PackedSeqs
"""

from leagues.model.attention import PackedSeqs
from leagues.model.checkpoint import load_pretrained, read_config, save_pretrained
from leagues.model.config import ModelConfig
from leagues.model.families import FAMILIES, config_from_hf
from leagues.model.tiny import TINY_NAME, resolve_model_path, write_tiny_moe
from leagues.model.tokenizer import load_tokenizer
from leagues.model.transformer import ForwardBatch, ForwardOutput, Transformer

__all__ = [
    "FAMILIES",
    "TINY_NAME",
    "ForwardBatch",
    "ForwardOutput",
    "ModelConfig",
    "PackedSeqs",
    "Transformer",
    "config_from_hf",
    "load_pretrained",
    "load_tokenizer",
    "read_config",
    "resolve_model_path",
    "save_pretrained",
    "write_tiny_moe",
]
