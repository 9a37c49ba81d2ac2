"""Small building blocks shared by every family: RMSNorm, rotary embeddings, the SwiGLU MLP.

Numerics follow the Hugging Face reference implementations (norm statistics in float32, rotary
angles in float32 then cast), so float32 logits agree with `transformers` to rounding.

Legend: T tokens, D model dim, F ffn dim, H heads, A head dim.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from leagues.kernels import batch_invariant
from leagues.model.config import ModelConfig


class InvariantLinear(nn.Linear):
    """`nn.Linear` computed batch-invariantly (deterministic mode swaps it in; same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_invariant.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.invariant = False
        """Deterministic mode: the row statistics are batch-invariant (`batch_invariant.rms_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.invariant:
            return batch_invariant.rms_norm(x, self.weight, self.eps)
        x_f32 = x.float()
        x_f32 = x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_f32.to(x.dtype)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, a smooth blend in between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [A/2] for the configured rope type."""
    exponent = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta**exponent)
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope_scaling.rope_type '{rope_type}' is not supported (default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions of a batch, HF 'rotate half' layout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def reset(self, device: torch.device | str) -> None:
        """Recompute the buffer (after building on the meta device)."""
        self.inv_freq = rope_inv_freq(self.cfg).to(device)

    def forward(self, positions_T: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_TA = positions_T.float()[:, None] * self.inv_freq.float()[None, :]
        emb_TA = torch.cat([freqs_TA, freqs_TA], dim=-1)
        return emb_TA.cos().to(dtype), emb_TA.sin().to(dtype)


def apply_rope(x_THA: torch.Tensor, cos_TA: torch.Tensor, sin_TA: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_THA.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_THA * cos_TA[:, None, :] + rotated * sin_TA[:, None, :]


class GatedMLP(nn.Module):
    """SwiGLU MLP with gate and up projections fused into one [2F, D] weight."""

    def __init__(self, dim: int, ffn_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * ffn_dim, bias=bias)
        self.w2 = nn.Linear(ffn_dim, dim, bias=bias)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        gate_TF, up_TF = self.w13(x_TD).chunk(2, dim=-1)
        return self.w2(F.silu(gate_TF) * up_TF)
