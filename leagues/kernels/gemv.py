"""Dense projections of a few rows (decode steps) as GEMV launches that spread over the GPU.

Where it sits: the attention projections (`leagues.model.attention`: fused q/k/v and output) call `linear`,
which takes this path on CUDA for 16-bit inputs of at most `MAX_ROWS` rows without gradients (the engine's
small decode steps) and is `F.linear` otherwise (training, prefill, large batches, the CPU, deterministic mode,
which has its own invariant product).

Decisions:
- At one row a library GEMM launches few blocks (an 8 x 64 tile of the output: 24 blocks for a 1,536 x 1,024
  weight) and reads the weight at a fraction of the card's bandwidth; the step is latency-bound there. Here a
  program owns `block_n` output columns of one row and has a whole reduction row of the weight in flight, so
  a launch has hundreds of programs (the layout the small fused MoE kernels measured best at 1-8 tokens).
- Rows are programs too (grid: column blocks x rows): a weight slab is read from memory once and from L2 by
  the other rows' programs, which costs less than a launch per row or a row loop holding every row's
  accumulator.
- Accumulation in float32, the bias added in float32, one rounding to the input's dtype: what the library
  GEMM's epilogue does, within its reduction order (not bitwise: the engine's default mode never was).
- A `torch.library` operator, opaque to `torch.compile`, so the compiled decode blocks call it inside their
  CUDA graphs. `linear_reference` defines the numbers.

Legend: M rows, K reduction (input features), N output features.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the reference needs none
    triton = None

MAX_ROWS = 8
"""Up to this many rows `linear` runs the GEMV kernel on CUDA (0 turns it off: `benchmarks/engine.py --gemv-rows`)."""
TILES = dict(block_n=4, block_k=1024, num_warps=2)
"""Output columns a program owns, the reduction tile it loads at once, warps a program
(`benchmarks/gemv_tune.py` sweeps them)."""


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` runs the kernel: CUDA, 16-bit (the weight too), 2-D, at most `MAX_ROWS` rows, no
    gradient."""
    return (
        triton is not None
        and x.is_cuda
        and x.dim() == 2
        and x.shape[0] <= MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; a few rows on CUDA run the GEMV kernel (see `applies`)."""
    if applies(x, weight):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_reference(x_MK: torch.Tensor, w_NK: torch.Tensor, b_N: torch.Tensor | None = None) -> torch.Tensor:
    """float32 products and bias, one rounding to x's dtype."""
    out = x_MK.float() @ w_NK.float().T
    if b_N is not None:
        out = out + b_N.float()
    return out.to(x_MK.dtype)


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_x, stride_w, stride_o,
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(1).to(tl.int64)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + row * stride_x + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def gemv_triton(x_MK: torch.Tensor, w_NK: torch.Tensor, b_N: torch.Tensor | None = None, **tiles) -> torch.Tensor:
    """`linear_reference` in one launch (CUDA, or the CPU under TRITON_INTERPRET=1); `tiles` overrides `TILES`."""
    tiles = TILES | tiles
    x_MK, w_NK = x_MK.contiguous(), w_NK.contiguous()
    (rows, k), n = x_MK.shape, w_NK.shape[0]
    out_MN = x_MK.new_empty(rows, n)
    if rows and n:
        block_n = tiles["block_n"]
        _gemv_kernel[(triton.cdiv(n, block_n), rows)](
            x_MK, w_NK, w_NK if b_N is None else b_N.contiguous(), out_MN, n, k, x_MK.stride(0), w_NK.stride(0),
            out_MN.stride(0), HAS_BIAS=b_N is not None, BLOCK_N=block_n,
            BLOCK_K=min(tiles["block_k"], triton.next_power_of_2(k)), num_warps=tiles["num_warps"],
        )  # fmt: skip
    return out_MN


@torch.library.custom_op("leagues::gemv", mutates_args=())
def gemv(x_MK: torch.Tensor, w_NK: torch.Tensor, b_N: torch.Tensor | None = None) -> torch.Tensor:
    return gemv_triton(x_MK, w_NK, b_N)


@gemv.register_fake
def _(x_MK, w_NK, b_N=None):
    return x_MK.new_empty(x_MK.shape[0], w_NK.shape[0])
