"""Grouped matrix products for MoE experts: one launch for every expert's token block.

Tokens arrive sorted by expert, and `offs_E` holds the cumulative row count per expert (int32), the
layout `torch._grouped_mm` takes. The fast path is `torch._grouped_mm` on CUDA in bf16; the reference
loops over experts with plain matmuls and runs anywhere (CPU tests, float32 parity checks).

Legend: N rows (token-expert pairs sorted by expert), I input dim, O output dim, E experts.
"""

import torch


def grouped_mm_reference(x_NI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ w[e].T, one matmul per non-empty expert."""
    bounds = [0, *offs_E.tolist()]
    outs = [x_NI[bounds[e] : bounds[e + 1]] @ w_EOI[e].T for e in range(w_EOI.shape[0])]
    return torch.cat(outs, dim=0) if outs else x_NI.new_empty(0, w_EOI.shape[1])


def grouped_mm_gathered(x_NI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """The reference without host syncs, for traced code (`torch.compile` off CUDA/bf16): each row's expert
    weight is gathered and applied as a batched matrix-vector product (N x O x I memory: small models only)."""
    rows_N = torch.arange(x_NI.shape[0], device=x_NI.device, dtype=offs_E.dtype)
    expert_N = torch.searchsorted(offs_E, rows_N, right=True).clamp(max=w_EOI.shape[0] - 1)
    return torch.bmm(w_EOI[expert_N], x_NI[:, :, None])[:, :, 0]


def grouped_mm_fast(x_NI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm` with the weight seen as [E, I, O] (a transposed view, no copy)."""
    return torch._grouped_mm(x_NI, w_EOI.transpose(-2, -1), offs=offs_E)


def can_use_fast(x_NI: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """The fast kernel wants CUDA, bf16, and 16-byte-aligned rows."""
    aligned = (x_NI.shape[-1] * x_NI.element_size()) % 16 == 0 and (w_EOI.shape[1] * w_EOI.element_size()) % 16 == 0
    return x_NI.is_cuda and x_NI.dtype == torch.bfloat16 and w_EOI.dtype == torch.bfloat16 and aligned


def grouped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Dispatch: `impl` is "auto" (fast where it can run), "grouped" (force the fast kernel) or "reference"."""
    if impl == "grouped" or (impl == "auto" and can_use_fast(x_NI, w_EOI)):
        return grouped_mm_fast(x_NI, w_EOI, offs_E)
    if torch.compiler.is_compiling():
        return grouped_mm_gathered(x_NI, w_EOI, offs_E)
    return grouped_mm_reference(x_NI, w_EOI, offs_E)
