"""Model families: how each Hugging Face architecture maps onto `ModelConfig` and our parameter names.

A family is data: a config reader and a weight table. The table maps each of our parameter names
(`{i}` a layer index) to the HF tensor names it is made from; several names are concatenated along
dim 0 (gate and up projections into `w13`), and `{e}` names are stacked over experts into a leading
`[E, ...]` dim. `checkpoint.py` walks the table in both directions, so loading and saving share one
mapping and a round trip is exact.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from leagues.model.config import ModelConfig


@dataclass(frozen=True, slots=True)
class HF:
    names: tuple[str, ...]
    per_expert: bool = False


def hf(*names: str) -> HF:
    return HF(names)


def hf_experts(*names: str) -> HF:
    return HF(names, per_expert=True)


L = "model.layers.{i}."
TOP = {
    "embed.weight": hf("model.embed_tokens.weight"),
    "norm.weight": hf("model.norm.weight"),
    "lm_head.weight": hf("lm_head.weight"),
}
BLOCK = {
    "layers.{i}.attn_norm.weight": hf(L + "input_layernorm.weight"),
    "layers.{i}.mlp_norm.weight": hf(L + "post_attention_layernorm.weight"),
    **{f"layers.{{i}}.attn.w{x}.{p}": hf(L + f"self_attn.{x}_proj.{p}") for x in "qkvo" for p in ("weight", "bias")},
    "layers.{i}.attn.q_norm.weight": hf(L + "self_attn.q_norm.weight"),
    "layers.{i}.attn.k_norm.weight": hf(L + "self_attn.k_norm.weight"),
}
DENSE_MLP = {
    f"layers.{{i}}.mlp.w13.{p}": hf(L + f"mlp.gate_proj.{p}", L + f"mlp.up_proj.{p}") for p in ("weight", "bias")
} | {f"layers.{{i}}.mlp.w2.{p}": hf(L + f"mlp.down_proj.{p}") for p in ("weight", "bias")}
QWEN_MOE = {
    "layers.{i}.moe.router.weight": hf(L + "mlp.gate.weight"),
    "layers.{i}.moe.experts.w13": hf_experts(
        L + "mlp.experts.{e}.gate_proj.weight", L + "mlp.experts.{e}.up_proj.weight"
    ),
    "layers.{i}.moe.experts.w2": hf_experts(L + "mlp.experts.{e}.down_proj.weight"),
}
SHARED_EXPERT = {
    "layers.{i}.moe.shared.w13.weight": hf(
        L + "mlp.shared_expert.gate_proj.weight", L + "mlp.shared_expert.up_proj.weight"
    ),
    "layers.{i}.moe.shared.w2.weight": hf(L + "mlp.shared_expert.down_proj.weight"),
    "layers.{i}.moe.shared_gate.weight": hf(L + "mlp.shared_expert_gate.weight"),
}
MIXTRAL_MOE = {
    "layers.{i}.moe.router.weight": hf(L + "block_sparse_moe.gate.weight"),
    "layers.{i}.moe.experts.w13": hf_experts(
        L + "block_sparse_moe.experts.{e}.w1.weight", L + "block_sparse_moe.experts.{e}.w3.weight"
    ),
    "layers.{i}.moe.experts.w2": hf_experts(L + "block_sparse_moe.experts.{e}.w2.weight"),
}


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    architecture: str
    """The HF `architectures[0]` this family loads."""
    weights: dict[str, HF]
    read_config: Callable[[dict[str, Any]], dict[str, Any]]
    """Family-specific `ModelConfig` fields from config.json (the common ones are read by `config_from_hf`)."""


def _rope(hf_cfg: dict) -> dict[str, Any]:
    params = dict(hf_cfg.get("rope_parameters") or hf_cfg.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf_cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    return {"rope_theta": float(theta), "rope_scaling": params if rope_type != "default" else None}


def _sparse_layers(hf_cfg: dict, num_experts: int) -> tuple[int, ...]:
    """Qwen-MoE placement: layer i is sparse unless listed in mlp_only_layers, every decoder_sparse_step-th."""
    step, dense = hf_cfg.get("decoder_sparse_step", 1), set(hf_cfg.get("mlp_only_layers") or [])
    if num_experts <= 0:
        return ()
    return tuple(i for i in range(hf_cfg["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0)


def _qwen_moe(hf_cfg: dict, shared: bool) -> dict[str, Any]:
    num_experts = hf_cfg.get("num_experts", hf_cfg.get("num_local_experts", 0))
    out = {
        "num_experts": num_experts,
        "top_k": hf_cfg["num_experts_per_tok"],
        "expert_ffn_dim": hf_cfg["moe_intermediate_size"],
        "norm_topk_prob": hf_cfg.get("norm_topk_prob", False),
        "moe_layers": _sparse_layers(hf_cfg, num_experts),
    }
    if shared:
        out |= {"shared_expert_ffn_dim": hf_cfg["shared_expert_intermediate_size"], "shared_expert_gate": True}
    return out


def _all_moe(hf_cfg: dict, num_experts_key: str, renorm: bool | None) -> dict[str, Any]:
    return {
        "num_experts": hf_cfg[num_experts_key],
        "top_k": hf_cfg["num_experts_per_tok"],
        "expert_ffn_dim": hf_cfg["intermediate_size"],
        "norm_topk_prob": hf_cfg.get("norm_topk_prob", False) if renorm is None else renorm,
        "moe_layers": tuple(range(hf_cfg["num_hidden_layers"])),
    }


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            TOP | BLOCK | DENSE_MLP | QWEN_MOE,
            lambda c: _qwen_moe(c, shared=False) | {"qk_norm": "head", "qkv_bias": c.get("attention_bias", False)},
        ),
        Family(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            TOP | BLOCK | DENSE_MLP | QWEN_MOE | SHARED_EXPERT,
            lambda c: _qwen_moe(c, shared=True) | {"qkv_bias": c.get("qkv_bias", True)},
        ),
        Family(
            "mixtral",
            "MixtralForCausalLM",
            TOP | BLOCK | MIXTRAL_MOE,
            lambda c: _all_moe(c, "num_local_experts", renorm=True),
        ),
        Family(
            "olmoe",
            "OlmoeForCausalLM",
            TOP | BLOCK | QWEN_MOE,
            lambda c: (
                _all_moe(c, "num_experts", renorm=None)
                | {"qk_norm": "full", "qkv_bias": c.get("attention_bias", False), "clip_qkv": c.get("clip_qkv")}
            ),
        ),
        Family(
            "qwen3",
            "Qwen3ForCausalLM",
            TOP | BLOCK | DENSE_MLP,
            lambda c: {"qk_norm": "head", "qkv_bias": c.get("attention_bias", False)},
        ),
        Family(
            "llama",
            "LlamaForCausalLM",
            TOP | BLOCK | DENSE_MLP,
            lambda c: {
                "qkv_bias": c.get("attention_bias", False),
                "o_bias": c.get("attention_bias", False),
                "mlp_bias": c.get("mlp_bias", False),
            },
        ),
    )
}
BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}


def family_of(hf_cfg: dict, where: str = "config.json") -> Family:
    archs = hf_cfg.get("architectures") or []
    for arch in archs:
        if arch in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[arch]
    for fam in FAMILIES.values():
        if hf_cfg.get("model_type") == fam.name:
            return fam
    known = ", ".join(sorted(BY_ARCHITECTURE))
    raise ValueError(
        f"{where}: architectures {archs} (model_type {hf_cfg.get('model_type')!r}) not supported; known: {known}"
    )


def _check_supported(hf_cfg: dict, where: str) -> None:
    act = hf_cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported (silu)")
    if hf_cfg.get("use_sliding_window") or (hf_cfg.get("sliding_window") and hf_cfg.get("model_type") == "mixtral"):
        raise ValueError(f"{where}: sliding-window attention is not supported (set sliding_window to null)")


def config_from_hf(hf_cfg: dict, where: str = "config.json") -> ModelConfig:
    """Build a `ModelConfig` from an HF config dict; unsupported features raise naming the field."""
    fam = family_of(hf_cfg, where)
    _check_supported(hf_cfg, where)
    num_heads = hf_cfg["num_attention_heads"]
    try:
        fields = {
            "family": fam.name,
            "vocab_size": hf_cfg["vocab_size"],
            "dim": hf_cfg["hidden_size"],
            "num_layers": hf_cfg["num_hidden_layers"],
            "num_heads": num_heads,
            "num_kv_heads": hf_cfg.get("num_key_value_heads") or num_heads,
            "head_dim": hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // num_heads,
            "ffn_dim": hf_cfg.get("intermediate_size", 0),
            "norm_eps": hf_cfg.get("rms_norm_eps", 1e-6),
            "max_seq_len": hf_cfg.get("max_position_embeddings", 4096),
            "tie_embeddings": hf_cfg.get("tie_word_embeddings", False),
            **_rope(hf_cfg),
            **fam.read_config(hf_cfg),
        }
    except KeyError as err:
        raise ValueError(f"{where}: missing field {err.args[0]!r} for family {fam.name}") from None
    return ModelConfig(**fields, hf_config=dict(hf_cfg))
