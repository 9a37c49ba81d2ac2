"""The architecture of one transformer, in the model's own terms.

`ModelConfig` is what `leagues.model` builds from; `families.py` maps each Hugging Face `config.json`
onto it, and keeps the original dict so saving writes the same `config.json` back. One dataclass
covers dense and MoE layers: `moe_layers` lists which layers route through experts.
"""

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    family: str
    """Registry name of the family (`qwen3_moe`, `qwen2_moe`, `mixtral`, `olmoe`, `qwen3`, `llama`)."""
    vocab_size: int
    dim: int
    """Hidden size of the residual stream."""
    num_layers: int
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    head_dim: int
    ffn_dim: int = 0
    """Intermediate size of the dense SwiGLU MLP (layers not in `moe_layers`)."""
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """HF `rope_parameters` beyond theta: `rope_type` `default`, `linear` or `llama3` with their fields."""
    max_seq_len: int = 4096
    qk_norm: Literal["none", "head", "full"] = "none"
    """RMSNorm on queries and keys: per head (Qwen3) or over all heads before the split (OLMoE)."""
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    clip_qkv: float | None = None
    """Clamp q, k and v to ±clip_qkv after projection (OLMoE option)."""
    tie_embeddings: bool = False
    num_experts: int = 0
    top_k: int = 0
    expert_ffn_dim: int = 0
    norm_topk_prob: bool = False
    """Renormalise the top-k router probabilities to sum to one."""
    shared_expert_ffn_dim: int = 0
    """Intermediate size of an always-on shared expert (0: none)."""
    shared_expert_gate: bool = False
    """Scale the shared expert by sigmoid(x · w_gate) (Qwen2-MoE)."""
    moe_layers: tuple[int, ...] = ()
    """Indices of the layers whose MLP is a mixture of experts."""
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)
    """The original `config.json`, written back unchanged on save."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.moe_layers and not (0 < self.top_k <= self.num_experts):
            raise ValueError(f"top_k ({self.top_k}) must be in 1..num_experts ({self.num_experts})")
        if any(not 0 <= i < self.num_layers for i in self.moe_layers):
            raise ValueError(f"moe_layers {self.moe_layers} out of range for {self.num_layers} layers")
        if self.num_layers - len(self.moe_layers) > 0 and self.ffn_dim <= 0:
            raise ValueError("dense layers need ffn_dim > 0")

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def expert_id_dtype(self):
        """Compact integer dtype for captured expert ids."""
        import torch

        return torch.uint8 if self.num_experts <= 256 else torch.int16
