"""The built-in tiny MoE: made on demand, loadable like any HF checkpoint, deterministic, with a fitting tokenizer."""

import json

import pytest
import torch

from leagues.model import TINY_NAME, ForwardBatch, load_pretrained, load_tokenizer, resolve_model_path, write_tiny_moe
from leagues.model.tiny import leagues_home


def test_resolve_tiny_moe_makes_a_loadable_checkpoint():
    path = resolve_model_path(TINY_NAME)
    assert path.is_dir() and path.is_relative_to(leagues_home())
    assert resolve_model_path(TINY_NAME) == path
    assert resolve_model_path(str(path)) == path  # an existing directory resolves to itself
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".tmp")]

    model = load_pretrained(path)
    cfg = model.config
    assert cfg.family == "qwen3_moe"
    assert (cfg.num_experts, cfg.top_k) == (8, 2)
    assert cfg.moe_layers == tuple(range(cfg.num_layers))
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen3_moe"

    ids = torch.arange(10) % cfg.vocab_size
    with torch.no_grad():
        out = model.run(ForwardBatch.packed(ids, [6, 4], capture_experts=True))
    assert out.logits_TV.shape == (10, cfg.vocab_size) and torch.isfinite(out.logits_TV).all()
    assert out.routed_experts_TLK.shape == (10, cfg.num_layers, 2)


def test_tiny_tokenizer_fits_the_model():
    path = resolve_model_path(TINY_NAME)
    cfg = load_pretrained(path).config
    tok = load_tokenizer(path)
    assert len(tok) <= cfg.vocab_size
    assert max(tok.get_vocab().values()) < cfg.vocab_size
    text = "Hello, world!\n\tx = 1 + 2"
    ids = tok.encode(text, add_special_tokens=False)
    assert max(ids) < cfg.vocab_size
    assert tok.decode(ids) == text
    assert tok.eos_token_id == cfg.hf_config["eos_token_id"]
    assert tok.pad_token_id == cfg.hf_config["pad_token_id"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_write_tiny_moe_is_deterministic(tmp_path):
    a, b, c = (write_tiny_moe(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    files = sorted(p.name for p in a.iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files and "config.json" in files
    assert sorted(p.name for p in b.iterdir()) == files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    # The cached built-in copy is the seed-0 recipe.
    cached = resolve_model_path(TINY_NAME)
    assert (cached / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()


def test_unknown_model_name():
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        resolve_model_path("no-such-model")
