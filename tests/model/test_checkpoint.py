"""HF checkpoint IO: bit-exact round trips, sharded checkpoints both ways, and clear errors on bad input."""

import json
import re

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from leagues.model import load_pretrained, save_pretrained
from leagues.model.checkpoint import INDEX, SINGLE

from .hf_cases import CASES, write_hf_checkpoint

IDS = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(3))


def read_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, single-file or sharded."""
    if (path / INDEX).is_file():
        files = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
    else:
        files = [SINGLE]
    out = {}
    for fname in files:
        with safe_open(path / fname, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert name not in out, f"{name} stored twice"
                out[name] = f.get_tensor(name)
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), f"only in first: {set(a) - set(b)}; only in second: {set(b) - set(a)}"
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_round_trip_is_bit_exact(case, tmp_path):
    src, out = tmp_path / "hf", tmp_path / "ours"
    write_hf_checkpoint(case, src)
    model = load_pretrained(src, dtype=None)
    save_pretrained(model, out)
    assert (out / SINGLE).is_file() and not (out / INDEX).exists()
    assert_same_tensors(read_tensors(src), read_tensors(out))
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_bf16_checkpoint_keeps_bf16(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "ours"
    hf_model = write_hf_checkpoint("qwen3_moe", tmp_path / "f32")
    hf_model.to(torch.bfloat16).save_pretrained(src)
    assert {t.dtype for t in read_tensors(src).values()} == {torch.bfloat16}
    model = load_pretrained(src, dtype=None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert logits(model).dtype == torch.bfloat16
    save_pretrained(model, out)
    assert_same_tensors(read_tensors(src), read_tensors(out))
    # An explicit dtype converts on load, and on save.
    assert {p.dtype for p in load_pretrained(src).parameters()} == {torch.float32}
    save_pretrained(model, tmp_path / "f32-out", dtype=torch.float32)
    assert {t.dtype for t in read_tensors(tmp_path / "f32-out").values()} == {torch.float32}
    # config.json names the dtype the weights were written in, as transformers reads it
    for directory, name in ((out, "bfloat16"), (tmp_path / "f32-out", "float32")):
        assert json.loads((directory / "config.json").read_text())["dtype"] == name
        assert transformers.AutoConfig.from_pretrained(directory).dtype == getattr(torch, name)


# ---------------------------------------------------------------- sharded checkpoints


@pytest.mark.parametrize("case", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_load_hf_sharded_checkpoint(case, tmp_path):
    write_hf_checkpoint(case, tmp_path / "single")
    write_hf_checkpoint(case, tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / INDEX).is_file()
    assert not (tmp_path / "sharded" / SINGLE).exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    assert_same_tensors(read_tensors(tmp_path / "single"), read_tensors(tmp_path / "sharded"))
    ref = logits(load_pretrained(tmp_path / "single"))
    assert torch.equal(logits(load_pretrained(tmp_path / "sharded")), ref)


@pytest.mark.parametrize("case", ["qwen3_moe", "olmoe"])
def test_save_sharded_loads_back_here_and_in_transformers(case, tmp_path):
    hf_model = write_hf_checkpoint(case, tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    ref = logits(model)
    out = tmp_path / "ours"
    save_pretrained(model, out, max_shard_bytes=20_000)

    index = json.loads((out / INDEX).read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / SINGLE).exists()
    assert sorted(set(index["weight_map"].values())) == shards
    for shard in shards:  # every shard is at most the limit, unless it holds one tensor larger than it
        tensors = load_file(out / shard)
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 20_000, shard
    tensors = read_tensors(out)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert_same_tensors(read_tensors(tmp_path / "hf"), tensors)

    assert torch.equal(logits(load_pretrained(out)), ref)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        hf_logits = reloaded.eval()(IDS).logits
        hf_ref = hf_model(IDS).logits
    assert torch.equal(hf_logits, hf_ref)
    assert rel_err(ref, hf_logits) <= 1e-5


def test_save_leaves_no_temporary_files(tmp_path):
    write_hf_checkpoint("qwen3_moe", tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    save_pretrained(model, tmp_path / "single")
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=20_000)
    save_pretrained(model, tmp_path / "single")  # overwriting in place is fine too
    for out in ("single", "sharded"):
        files = sorted(p.name for p in (tmp_path / out).iterdir())
        assert not [f for f in files if f.endswith(".tmp") or f.startswith(".")], files
        assert "config.json" in files
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["config.json", SINGLE]


def test_resave_in_other_layout_replaces_old_weights(tmp_path):
    """Saving over an earlier checkpoint in another layout must not leave its index or shards to be loaded."""
    write_hf_checkpoint("qwen3_moe", tmp_path / "a", seed=0)
    write_hf_checkpoint("qwen3_moe", tmp_path / "b", seed=1)
    old, new = load_pretrained(tmp_path / "a"), load_pretrained(tmp_path / "b")
    out = tmp_path / "out"
    (out).mkdir()
    (out / "notes.txt").write_text("kept")
    save_pretrained(old, out, max_shard_bytes=20_000)
    save_pretrained(new, out)  # sharded -> single
    assert sorted(p.name for p in out.iterdir()) == ["config.json", SINGLE, "notes.txt"]
    assert torch.equal(logits(load_pretrained(out)), logits(new))
    save_pretrained(old, out, max_shard_bytes=20_000)  # single -> sharded
    assert not (out / SINGLE).exists() and (out / INDEX).is_file()
    assert torch.equal(logits(load_pretrained(out)), logits(old))
    save_pretrained(new, out, max_shard_bytes=40_000)  # fewer shards: the old higher-numbered ones go
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert shards == sorted(set(json.loads((out / INDEX).read_text())["weight_map"].values()))
    assert torch.equal(logits(load_pretrained(out)), logits(new))


# ---------------------------------------------------------------- bad input


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt"
    write_hf_checkpoint("qwen3_moe", path)
    return path


def edit_config(path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def edit_tensors(path, fn) -> None:
    tensors = load_file(path / SINGLE)
    fn(tensors)
    save_file(tensors, path / SINGLE, metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_pretrained(missing)


def test_missing_config_json(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"config\.json.*{re.escape(str(ckpt))}"):
        load_pretrained(ckpt)


def test_missing_weights_file(ckpt):
    (ckpt / SINGLE).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(SINGLE)}.*{re.escape(str(ckpt))}"):
        load_pretrained(ckpt)


def test_invalid_json_names_file_and_line(ckpt):
    (ckpt / "config.json").write_text('{\n  "model_type": "qwen3_moe",\n  "vocab_size": 96,,\n}\n')
    with pytest.raises(ValueError, match=re.escape(str(ckpt / "config.json")) + ":3"):
        load_pretrained(ckpt)


def test_unsupported_architecture(ckpt):
    edit_config(ckpt, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_pretrained(ckpt)


def test_missing_tensor(ckpt):
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    edit_tensors(ckpt, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=re.escape(name)):
        load_pretrained(ckpt)


def test_missing_tensor_in_sharded_checkpoint(tmp_path):
    path = tmp_path / "sharded"
    write_hf_checkpoint("qwen3_moe", path, max_shard_size="20KB")
    index = json.loads((path / INDEX).read_text())
    name = "model.layers.2.self_attn.k_norm.weight"
    del index["weight_map"][name]
    (path / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(name)):
        load_pretrained(path)


def test_extra_tensor(ckpt):
    name = "model.layers.0.mlp.bogus.weight"
    edit_tensors(ckpt, lambda t: t.__setitem__(name, torch.zeros(3)))
    with pytest.raises(ValueError, match=re.escape(name)):
        load_pretrained(ckpt)


def test_wrong_shape(ckpt):
    name = "model.layers.1.self_attn.q_proj.weight"  # ours: [num_heads * head_dim, dim] = [64, 64]
    edit_tensors(ckpt, lambda t: t.__setitem__(name, torch.zeros(48, 64)))
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.wq\.weight.*\(48, 64\).*\(64, 64\)"):
        load_pretrained(ckpt)


def test_wrong_shaped_expert_tensor(ckpt):
    name = "model.layers.0.mlp.experts.3.down_proj.weight"  # [dim, moe_intermediate] = [64, 32]
    edit_tensors(ckpt, lambda t: t.__setitem__(name, torch.zeros(64, 31)))
    with pytest.raises(ValueError, match=r"layers\.0\.moe\.experts\.w2.*experts\.3\.down_proj.*\(64, 31\).*\(64, 32\)"):
        load_pretrained(ckpt)


def test_fused_parts_with_compensating_shapes(ckpt):
    """gate [40, D] + up [24, D] concatenate to the right [2F, D] = [64, D]; each part must still be checked."""

    def skew(t):
        gate, up = "model.layers.2.mlp.experts.1.gate_proj.weight", "model.layers.2.mlp.experts.1.up_proj.weight"
        both = torch.cat([t[gate], t[up]])
        t[gate], t[up] = both[:40].clone(), both[40:].clone()

    edit_tensors(ckpt, skew)
    with pytest.raises(ValueError, match=r"layers\.2\.moe\.experts\.w13.*gate_proj.*\(40, 64\).*\(32, 64\)"):
        load_pretrained(ckpt)


def test_unsupported_hidden_act(ckpt):
    edit_config(ckpt, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act.*gelu"):
        load_pretrained(ckpt)


def test_unsupported_rope_type(ckpt):
    edit_config(ckpt, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    with pytest.raises(ValueError, match="rope_type.*yarn"):
        load_pretrained(ckpt)


def test_missing_required_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["moe_intermediate_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        load_pretrained(ckpt)
