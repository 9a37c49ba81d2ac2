"""Self-attention with a backend seam.

The projections, q/k norms and rotary embedding are the model's; *where keys and values live* is
the backend's. A backend is any object with `attend(layer_idx, q_THA, k_TGA, v_TGA) -> o_THA` over
the flat token axis of a batch:

- `PackedSeqs` (here): a packed variable-length batch described by `cu_seqlens`, no padding, causal
  within each sequence. The trainer and the plain `forward(input_ids_BT)` use it.
- The engine's paged-KV backend (in `leagues.engine`) writes k/v into cache blocks by `layer_idx`
  and attends over each sequence's cached prefix.

`PackedSeqs` picks the fastest exact kernel it can: one SDPA call when every sequence has the same
length, `varlen_attn` (FlashAttention) on CUDA in 16-bit dtypes otherwise, and elsewhere one batched SDPA call per
distinct length (RL batches of short answers have few distinct lengths, so a batch of 512 sequences
is a handful of calls, not 512). The per-sequence SDPA loop (`impl="sdpa_loop"`) is the reference. Inside a
compiled block on CUDA it is always `varlen_attn`, traced into the block's graph.

Legend: T tokens, B sequences, H query heads, G kv heads, A head dim, D model dim.
"""

import inspect
import sys
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from leagues.kernels import batch_invariant, gemv, invariant_attention
from leagues.model.config import ModelConfig
from leagues.model.layers import InvariantLinear, RMSNorm, apply_rope

_VARLEN: tuple | None = None
"""(torch's varlen attention or None, whether it takes `is_causal`), once `varlen_function` has imported it."""


def varlen_function():
    """torch's FlashAttention varlen function (None on a torch without it), imported on first use: importing it
    loads the compiler (~2 s on a small CPU), which a process that never attends on CUDA (a CPU server, the
    CLI) does without. Newer versions take `is_causal`, older ones a causal `window_size`."""
    global _VARLEN
    if _VARLEN is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:  # older torch: the per-sequence loop serves
            varlen_attn = None
        _VARLEN = (varlen_attn, varlen_attn is not None and "is_causal" in inspect.signature(varlen_attn).parameters)
    return _VARLEN[0]


class AttentionBackend(Protocol):
    def attend(self, layer_idx: int, q_THA: torch.Tensor, k_TGA: torch.Tensor, v_TGA: torch.Tensor) -> torch.Tensor:
        """Causal attention for the batch's tokens; returns [T, H, A]."""
        ...


def _sdpa_BHLA(q_THA, k_TGA, v_TGA, num_seqs: int) -> torch.Tensor:
    """Causal SDPA over `num_seqs` equal-length sequences laid end to end."""
    q, k, v = (t.unflatten(0, (num_seqs, -1)).transpose(1, 2) for t in (q_THA, k_TGA, v_TGA))
    gqa = q.shape[1] != k.shape[1]
    o_BHLA = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return o_BHLA.transpose(1, 2).flatten(0, 1)


def varlen_causal(q_THA, k_SGA, v_SGA, cu_q_B1, cu_k_B1, max_q: int, max_k: int) -> torch.Tensor:
    """FlashAttention over packed sequences (CUDA); queries are the last tokens of their keys (bottom-right causal)."""
    if k_SGA.shape[1] != q_THA.shape[1]:
        rep = q_THA.shape[1] // k_SGA.shape[1]
        k_SGA, v_SGA = k_SGA.repeat_interleave(rep, dim=1), v_SGA.repeat_interleave(rep, dim=1)
    cu_q, cu_k = cu_q_B1.to(torch.int32), cu_k_B1.to(torch.int32)
    varlen_attn = varlen_function()
    if _VARLEN[1]:
        return varlen_attn(q_THA, k_SGA, v_SGA, cu_q, cu_k, max_q, max_k, is_causal=True)
    return varlen_attn(q_THA, k_SGA, v_SGA, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))


@dataclass(slots=True)
class PackedSeqs:
    """A packed batch: sequence b owns tokens cu_seqlens[b]:cu_seqlens[b+1]."""

    cu_seqlens_B1: torch.Tensor
    max_seqlen: int
    lengths: tuple[int, ...]
    impl: str = "auto"
    """"auto", "sdpa_loop" (reference) or "varlen"."""
    invariant_len: int = 0
    """Deterministic mode (set by the model): batch-invariant attention with keys padded to this length."""
    invariant_tables: tuple | None = None
    """Deterministic mode on CUDA: the kernel's tables of this batch, built by the first layer."""
    max_seqlen_bound: int = 0
    """`max_seqlen` rounded up to a power of two: the bound a compiled graph is specialised on."""

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device | str = "cpu", impl: str = "auto") -> "PackedSeqs":
        if not lengths or min(lengths) <= 0:
            raise ValueError(f"sequence lengths must be positive, got {lengths}")
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        if "torch._dynamo" in sys.modules:  # a compiled graph serves any number of sequences (nothing compiles else)
            torch._dynamo.maybe_mark_dynamic(cu, 0)
        bound = 1 << (max(lengths) - 1).bit_length()
        return cls(cu_seqlens_B1=cu, max_seqlen=max(lengths), lengths=tuple(lengths), impl=impl, max_seqlen_bound=bound)

    def positions(self) -> torch.Tensor:
        """Position of every token within its own sequence, [T]."""
        device = self.cu_seqlens_B1.device
        return torch.cat([torch.arange(n, device=device) for n in self.lengths])

    def attend(self, layer_idx: int, q_THA, k_TGA, v_TGA) -> torch.Tensor:
        if torch.compiler.is_compiling() and self._traceable(q_THA):
            # Inside a compiled block: FlashAttention reads only `cu_seqlens` (any number of sequences) and the
            # power-of-two bound on their length, so the graph holds the whole block and serves every packing.
            cu, bound = self.cu_seqlens_B1, self.max_seqlen_bound
            return varlen_causal(q_THA, k_TGA, v_TGA, cu, cu, bound, bound)
        return self._attend(q_THA, k_TGA, v_TGA)

    def _traceable(self, q_THA: torch.Tensor) -> bool:
        flash_dtype = q_THA.dtype in (torch.float16, torch.bfloat16)
        if self.impl != "auto" or self.invariant_len or not q_THA.is_cuda or not flash_dtype:
            return False
        return varlen_function() is not None

    # Outside compiled blocks: the lengths are Python values, and a compiled graph guarding on them would
    # recompile for every new packing (each RL step). `compiler_boundaries` hides it from the compiler.
    def _attend(self, q_THA, k_TGA, v_TGA) -> torch.Tensor:
        if self.invariant_len:
            return self._invariant(q_THA, k_TGA, v_TGA)
        uniform = len(set(self.lengths)) == 1
        if self.impl == "auto" and uniform:
            return _sdpa_BHLA(q_THA, k_TGA, v_TGA, len(self.lengths))
        flash_dtype = q_THA.dtype in (torch.float16, torch.bfloat16)  # FlashAttention has no float32 kernel
        flash = self.impl == "auto" and q_THA.is_cuda and flash_dtype and varlen_function() is not None
        if self.impl == "varlen" or flash:
            cu, n = self.cu_seqlens_B1, self.max_seqlen
            return varlen_causal(q_THA, k_TGA, v_TGA, cu, cu, n, n)
        if self.impl == "auto":
            return self._sdpa_by_length(q_THA, k_TGA, v_TGA)
        bounds = [0, *torch.tensor(self.lengths).cumsum(0).tolist()]
        parts = [_sdpa_BHLA(q_THA[s:e], k_TGA[s:e], v_TGA[s:e], 1) for s, e in zip(bounds, bounds[1:], strict=False)]
        return torch.cat(parts, dim=0)

    def _invariant(self, q_THA, k_TGA, v_TGA) -> torch.Tensor:
        if q_THA.is_cuda:  # the Triton kernel; its backward differentiates the ordinary path
            ordinary = PackedSeqs(self.cu_seqlens_B1, self.max_seqlen, self.lengths)
            if self.invariant_tables is None:
                heads = (q_THA.shape[1], k_TGA.shape[1])
                self.invariant_tables = invariant_attention.packed_tables(self.cu_seqlens_B1, self.lengths, *heads)
            return invariant_attention.packed_attention(
                q_THA,
                k_TGA,
                v_TGA,
                self.cu_seqlens_B1,
                self.lengths,
                lambda q, k, v: ordinary._attend(q, k, v),
                self.invariant_tables,
            )
        bounds, scale, parts = [0, *torch.tensor(self.lengths).cumsum(0).tolist()], q_THA.shape[-1] ** -0.5, []
        for s, e in zip(bounds, bounds[1:], strict=False):
            pos_Q = torch.arange(e - s, device=q_THA.device)
            parts.append(
                invariant_attention.attention(q_THA[s:e], k_TGA[s:e], v_TGA[s:e], pos_Q, self.invariant_len, scale)
            )
        return torch.cat(parts, dim=0)

    def _sdpa_by_length(self, q_THA, k_TGA, v_TGA) -> torch.Tensor:
        """One batched SDPA per distinct sequence length; rows gathered and scattered back by index."""
        starts: dict[int, list[int]] = {}
        offset = 0
        for n in self.lengths:
            starts.setdefault(n, []).append(offset)
            offset += n
        out_THA = q_THA.new_empty(q_THA.shape)
        for n, firsts in starts.items():
            rows = (torch.tensor(firsts)[:, None] + torch.arange(n)).flatten().to(q_THA.device)
            o = _sdpa_BHLA(q_THA[rows], k_TGA[rows], v_TGA[rows], len(firsts))
            out_THA = out_THA.index_copy(0, rows, o)
        return out_THA


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.dim, q_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, kv_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.dim, bias=cfg.o_bias)
        self.qk_norm, self.clip_qkv = cfg.qk_norm, cfg.clip_qkv
        if cfg.qk_norm != "none":
            norm_q, norm_k = (cfg.head_dim, cfg.head_dim) if cfg.qk_norm == "head" else (q_dim, kv_dim)
            self.q_norm, self.k_norm = RMSNorm(norm_q, cfg.norm_eps), RMSNorm(norm_k, cfg.norm_eps)
        self.wqkv: tuple[torch.Tensor, torch.Tensor | None] | None = None
        """After `fuse_qkv`: one [(H + 2G) * A, D] weight (and bias) whose row blocks are wq, wk and wv."""

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Give q, k and v one weight so their projection is one GEMM (the engine's decode is launch-bound).

        The three parameters become views of the fused tensor (`.data` rebinding keeps the `Parameter`
        objects), so in-place weight loads by our or HF names update the fused weight and the parameter
        names, shapes and state dict stay as they were. Anything that replaces a parameter's storage
        (offloading to host memory) breaks the views: call this again afterwards.
        """
        linears = (self.wq, self.wk, self.wv)
        weight = torch.cat([m.weight for m in linears])
        bias = torch.cat([m.bias for m in linears]) if self.wq.bias is not None else None
        start = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight.data = weight[start : start + rows]
            if bias is not None:
                m.bias.data = bias[start : start + rows]
            start += rows
        self.wqkv = (weight, bias)

    def _project(self, x_TD: torch.Tensor):
        if self.wqkv is None:
            return self.wq(x_TD), self.wk(x_TD), self.wv(x_TD)
        # a fused product's output columns are each the separate product's (same kernel, same reduction order)
        linear = batch_invariant.linear if isinstance(self.wq, InvariantLinear) else gemv.linear
        qkv = linear(x_TD, *self.wqkv)
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return qkv.split([q_dim, kv_dim, kv_dim], dim=-1)

    def _qkv(self, x_TD: torch.Tensor, head_norm: bool = True):
        q, k, v = self._project(x_TD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q_THA = q.unflatten(-1, (self.num_heads, self.head_dim))
        k_TGA = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v_TGA = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.qk_norm == "head" and head_norm:
            q_THA, k_TGA = self.q_norm(q_THA), self.k_norm(k_TGA)
        return q_THA, k_TGA, v_TGA

    def forward(self, x_TD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], backend: AttentionBackend):
        cos_TA, sin_TA = rope
        if isinstance(self.wq, InvariantLinear):  # deterministic mode: per-head norms and rotary in one launch
            q_THA, k_TGA, v_TGA = self._qkv(x_TD, head_norm=False)
            norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm == "head" else ()
            q_THA, k_TGA = batch_invariant.norm_rope(q_THA, k_TGA, cos_TA, sin_TA, *norms)
        else:
            q_THA, k_TGA, v_TGA = self._qkv(x_TD)
            q_THA, k_TGA = apply_rope(q_THA, cos_TA, sin_TA), apply_rope(k_TGA, cos_TA, sin_TA)
        o_TD = backend.attend(self.layer_idx, q_THA, k_TGA, v_TGA).flatten(-2)
        if type(self.wo) is nn.Linear and gemv.applies(o_TD, self.wo.weight):  # a decode step's few rows
            return gemv.gemv(o_TD, self.wo.weight, self.wo.bias)
        return self.wo(o_TD)


def compiler_boundaries() -> None:
    """What the compiler must not trace, marked before anything compiles (by `Transformer.compile_blocks`): the
    packed attention outside compiled blocks. Marking imports the compiler, so it waits for the first compile;
    the varlen function is imported too, since compiled code only reads it."""
    if not getattr(PackedSeqs._attend, "_leagues_disabled", False):
        disabled = torch.compiler.disable(PackedSeqs._attend)
        disabled._leagues_disabled = True
        PackedSeqs._attend = disabled
    varlen_function()
