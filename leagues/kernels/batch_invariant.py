"""Batch-invariant kernels for deterministic mode: each output row depends only on its own inputs, bit for bit,
whatever else is in the batch, so a token's logits are the same in a packed training batch, a chunked prefill
and a decode step.

A library matmul picks its blocking, and for small row counts its algorithm (split-K), by the batch shape, so
row r of `x @ w.T` can round differently at M = 1 (decode) and M = 300 (a packed training batch); reductions
(norms, softmax statistics, sums over top-k) can likewise change their tree with the row count.

Decisions:
- Two implementations of every function, one code path: Triton kernels on CUDA, pure-torch references on
  the CPU. The two need not agree with each other bit for bit; each agrees with itself across batch shapes.
- Triton kernels never split a reduction across programs and fix its step (the K tile of a product): a row's
  reduction order is then a function of the reduction length only. A row's position inside a tile does not
  change its arithmetic (the tensor-core product of a row reads only that row), so the dense product and the
  MoE's expert tiles may size their programs by the shape and the card (a decode row takes small tiles,
  `dense_tiles`, `fused_moe.invariant_tiles`) as long as the K step stays pinned; every other kernel keeps one
  tile configuration whatever the shapes.
- Attention is `invariant_attention`'s (one kernel for the trainer's packed keys and the engine's paged cache).
- The CPU references: a product is an elementwise multiply and a sum over the last (contiguous) axis, whose
  reduction order depends only on that axis's length. They are slow (M x N x K intermediates) and serve small
  models in tests.
- The MoE on CUDA runs `fused_moe`'s kernels at every batch size, the engine's decode steps and the trainer's
  packed batches alike: the route kernel is one program a token, the expert kernels are tensor-core tiles of
  16 pairs of one expert and a pinned K step (a pair's dot products do not depend on the pairs beside it in a
  tile, nor on the tile's columns, warps or stages), and the top-k sum adds in index order in float32 before
  one rounding. Expert parallelism runs the same tiles on the
  rows it receives and applies the routing weight after the exchange, the same float32 product.
- Only forward passes need to be invariant (rollout and trainer logprobs). Backward passes recompute with the
  ordinary differentiable ops (cuBLAS, FlashAttention, grouped GEMM).

Legend: M rows, N outputs, K inputs, H query heads, G kv heads, A head dim, N rows of experts (sorted), E experts,
B sequences, T tokens, V vocabulary.
"""

import torch

from leagues.kernels import fused_moe, num_sms
from leagues.kernels.grouped_gemm import grouped_mm as ordinary_grouped_mm

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the CPU references need none
    triton = None

LOG2E = 1.4426950408889634
# The K step of every product is pinned: that is what makes the kernels batch-invariant. The dense product picks
# its output tile by shape (`dense_tiles`), never its K step: a row's sum then runs the same instructions in the
# same order (measured bitwise equal on an H100 for 13 tile shapes, 1 to 300 rows).
MM_BLOCK_M, MM_BLOCK_N, MM_BLOCK_K, MM_WARPS, MM_STAGES = 128, 128, 64, 8, 3
MM_FEW_ROWS = ((16, (16, 32, 2, 4)), (64, (64, 32, 4, 3)))
"""(at most this many rows, (block_m, block_n, warps, stages)) of the dense product, smallest first; more rows take
the pinned 128 x 128 tile where its grid fills the card, else `MM_SMALL_GRID`. A decode row's projection is a dozen
programs at 128 x 128 and ~50 at 16 x 32 (`benchmarks/matmul_tiles.py`, H100, 1,024 x 1,536 and 1,024 x 1,024: one
row 5.2 against 10.5 and 10.7 us; 64 rows at 64 x 32 tiles 6.0 and 5.8 against 10.9)."""
MM_SMALL_GRID = (64, 64, 4, 3)
"""The tile of more than 64 rows when 128 x 128 tiles would leave SMs idle (a batch-256 decode step's q/k/v and
output projections: 24 and 16 programs). 256 rows, 1,024 x 1,536 and 1,024 x 1,024: 6.9 against 11.2 and 11.1 us
on an H100, each row's bits unchanged (`benchmarks/matmul_tiles.py`); the LM head's 500 programs keep 128 x 128
(39.9 against 52.1 us)."""
ROW_BLOCK = 4096


def uses_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels serve `x` (CUDA); elsewhere the torch references do."""
    return x.is_cuda and triton is not None


# ---------------------------------------------------------------------------------------------- references


def matmul_nt_reference(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x @ w.T with a per-row reduction order that does not depend on M."""
    return (x_MK[:, None, :] * w_NK[None, :, :]).sum(dim=-1)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm formula (statistics in float32, normalised value cast back before the weight)."""
    x_f32 = x.float()
    x_f32 = x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x_f32.to(x.dtype)


def add_rms_norm_reference(x, y, weight, eps: float):
    """(x + y, RMSNorm of x + y) as the model's ops compute them; y None: (x, RMSNorm of x). y of one more axis
    than x: float32 pair outputs [..., K, D], summed over K in index order and rounded to x's dtype first."""
    if y is not None and y.dim() == x.dim() + 1:
        y = sum_rows(y.reshape(-1, *y.shape[-2:])).view(x.shape).to(x.dtype)
    s = x if y is None else x + y
    return s, rms_norm_reference(s, weight, eps)


def norm_rope_reference(q_THA, k_TGA, cos_TA, sin_TA, q_weight_A=None, k_weight_A=None, eps: float = 0.0):
    """(q, k) after the per-head RMSNorm (if weights are given) and rotate-half rotary (cos/sin [T, A] in q's
    dtype): the model's unfused ops (`leagues.model.layers`)."""
    if q_weight_A is not None:
        q_THA, k_TGA = rms_norm_reference(q_THA, q_weight_A, eps), rms_norm_reference(k_TGA, k_weight_A, eps)

    def rope(x_THA):
        x1, x2 = x_THA.chunk(2, dim=-1)
        return x_THA * cos_TA[:, None, :] + torch.cat([-x2, x1], dim=-1) * sin_TA[:, None, :]

    return rope(q_THA), rope(k_TGA)


# ---------------------------------------------------------------------------------------------- triton kernels

if triton is not None:

    @triton.jit
    def _matmul_nt_kernel(
        x_ptr, w_ptr, o_ptr, tile_expert_ptr, tile_row0_ptr, tile_row_end_ptr,
        M, N, K, stride_xm, stride_we, stride_wn, stride_om,
        GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """o[rows] = x[rows] @ w.T (dense), or x[rows of expert e] @ w[e].T (grouped: a table maps tiles to
        experts and row ranges). The K loop runs in fixed BLOCK_K steps from 0: each row's order is fixed."""
        if GROUPED:  # N tiles vary fastest: programs in flight share one expert's rows and weights in L2
            pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        else:
            pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        if GROUPED:
            expert = tl.load(tile_expert_ptr + pid_m)
            if expert < 0:  # past the last tile of the last expert (the grid is an upper bound)
                return
            row0 = tl.load(tile_row0_ptr + pid_m)
            row_end = tl.load(tile_row_end_ptr + pid_m)
            w_ptr += expert.to(tl.int64) * stride_we
        else:
            row0 = pid_m * BLOCK_M
            row_end = M
        rows_m = row0 + tl.arange(0, BLOCK_M)
        cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        ok_m, ok_n = rows_m < row_end, cols_n < N
        x_ptrs = x_ptr + rows_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + cols_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
        acc_MN = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ok_k = offs_k < K - k0
            x_MK = tl.load(x_ptrs, mask=ok_m[:, None] & ok_k[None, :], other=0.0)
            w_KN = tl.load(w_ptrs, mask=ok_n[None, :] & ok_k[:, None], other=0.0)
            acc_MN = tl.dot(x_MK, w_KN, acc_MN, input_precision=PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        o_ptrs = o_ptr + rows_m.to(tl.int64)[:, None] * stride_om + cols_n[None, :]
        tl.store(o_ptrs, acc_MN.to(o_ptr.dtype.element_ty), mask=ok_m[:, None] & ok_n[None, :])

    @triton.jit
    def _store_rms_row(x, w_ptr, o_row, offs, ok, D, eps):
        """RMSNorm of one loaded row (statistics in float32 over the whole row, one fixed tree per row length;
        the normalised value rounded to x's dtype before the weight), stored at `o_row`."""
        x_f32 = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x_f32 * x_f32, axis=0) / D + eps)
        normed = (x_f32 * rstd).to(x.dtype)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0)
        out = w.to(tl.float32) * normed.to(tl.float32)
        tl.store(o_row + offs, out.to(o_row.dtype.element_ty), mask=ok)

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, D, stride_x, stride_o, eps, BLOCK_D: tl.constexpr):
        """One row per program, the whole row in one block: one fixed reduction tree per row length."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        ok = offs < D
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
        _store_rms_row(x, w_ptr, o_ptr + row * stride_o, offs, ok, D, eps)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, y_ptr, w_ptr, sum_ptr, o_ptr, D, stride_x, stride_y, stride_yk, stride_s, stride_o,
                             eps, K: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        """One row per program: s = x + y rounded to x's dtype (stored), then `_store_rms_row` of s. K > 0: y is
        a row's K float32 pair outputs, summed in index order and rounded to x's dtype first (`sum_pairs_triton`'s
        arithmetic)."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        ok = offs < D
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
        y = tl.load(y_ptr + row * stride_y + offs, mask=ok, other=0.0)
        if K > 0:
            for k in tl.static_range(1, K):
                y += tl.load(y_ptr + row * stride_y + k * stride_yk + offs, mask=ok, other=0.0)
            y = y.to(x.dtype)
        x = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_s + offs, x, mask=ok)
        _store_rms_row(x, w_ptr, o_ptr + row * stride_o, offs, ok, D, eps)

    @triton.jit
    def _norm_rope_row(src, dst, w_ptr, cos_row, sin_row, eps,
                       A: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr):  # fmt: skip
        """One head's row: RMSNorm over its A values (if NORM), then rotate-half rotary, each step rounded to
        the row's dtype where the unfused ops round (the norm's output, each product, the sum)."""
        offs = tl.arange(0, HALF)
        x1, x2 = tl.load(src + offs), tl.load(src + HALF + offs)
        dtype = x1.dtype
        if NORM:
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            rstd = 1.0 / tl.sqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / A + eps)
            w1, w2 = tl.load(w_ptr + offs).to(tl.float32), tl.load(w_ptr + HALF + offs).to(tl.float32)
            x1 = (w1 * (f1 * rstd).to(dtype).to(tl.float32)).to(dtype)
            x2 = (w2 * (f2 * rstd).to(dtype).to(tl.float32)).to(dtype)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        c1, c2 = tl.load(cos_row + offs).to(tl.float32), tl.load(cos_row + HALF + offs).to(tl.float32)
        s1, s2 = tl.load(sin_row + offs).to(tl.float32), tl.load(sin_row + HALF + offs).to(tl.float32)
        # x * cos + cat(-x2, x1) * sin, as the unfused ops compute it: each product rounded, then the sum
        o1 = (f1 * c1).to(dtype).to(tl.float32) + (-f2 * s1).to(dtype).to(tl.float32)
        o2 = (f2 * c2).to(dtype).to(tl.float32) + (f1 * s2).to(dtype).to(tl.float32)
        tl.store(dst + offs, o1.to(dtype))
        tl.store(dst + HALF + offs, o2.to(dtype))

    @triton.jit
    def _norm_rope_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
        H, G, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st, eps,
        A: tl.constexpr, NORM: tl.constexpr,
    ):  # fmt: skip
        """Program (token t, row h): query head h for h < H, else key head h - H; outputs contiguous."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        cos_row, sin_row = cos_ptr + t * stride_ct, sin_ptr + t * stride_st
        if h < H:
            src, dst = q_ptr + t * stride_qt + h * stride_qh, qo_ptr + (t * H + h) * A
            _norm_rope_row(src, dst, qw_ptr, cos_row, sin_row, eps, A, A // 2, NORM)
        else:
            g = h - H
            src, dst = k_ptr + t * stride_kt + g * stride_kh, ko_ptr + (t * G + g) * A
            _norm_rope_row(src, dst, kw_ptr, cos_row, sin_row, eps, A, A // 2, NORM)

    @triton.jit
    def _logsumexp_kernel(x_ptr, o_ptr, V, stride_x, BLOCK: tl.constexpr):
        """log(sum(exp(x))) of one float32 row: the max first (exact in any order), then per-lane sums of
        exp(x - max) over fixed BLOCK-wide steps and one fixed reduction tree."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m_L = tl.full([BLOCK], float("-inf"), tl.float32)
        for v0 in range(0, V, BLOCK):
            x = tl.load(x_ptr + row * stride_x + v0 + offs, mask=offs < V - v0, other=float("-inf"))
            m_L = tl.maximum(m_L, x)
        m = tl.max(m_L, axis=0)
        s_L = tl.zeros([BLOCK], tl.float32)
        for v0 in range(0, V, BLOCK):
            x = tl.load(x_ptr + row * stride_x + v0 + offs, mask=offs < V - v0, other=float("-inf"))
            s_L += tl.exp(x - m)
        tl.store(o_ptr + row, m + tl.log(tl.sum(s_L, axis=0)))


def precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def tile_table(counts_B: torch.Tensor, rows_per_tile: int, max_tiles: int):
    """Tiles of `rows_per_tile` over groups of `counts_B` rows, without a host sync: for each of `max_tiles`
    tiles its group (-1 past the end) and its first row within the group."""
    tiles_B = (counts_B + rows_per_tile - 1) // rows_per_tile
    ends_B = tiles_B.cumsum(0)
    tile_T = torch.arange(max_tiles, device=counts_B.device)
    group_T = torch.searchsorted(ends_B, tile_T, right=True)
    valid_T = group_T < len(counts_B)
    group_T = group_T.clamp(max=len(counts_B) - 1)
    row0_T = (tile_T - (ends_B - tiles_B)[group_T]) * rows_per_tile
    return torch.where(valid_T, group_T, -1).to(torch.int32), row0_T.to(torch.int32)


def matmul_nt_triton(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    x_MK, w_NK = x_MK.contiguous(), w_NK.contiguous()
    (num_rows, k), n = x_MK.shape, w_NK.shape[0]
    out_MN = x_MK.new_empty(num_rows, n)
    if num_rows == 0:
        return out_MN
    block_m, block_n, warps, stages = dense_tiles(num_rows, n, num_sms(x_MK.device))
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(n, block_n))
    _matmul_nt_kernel[grid](
        x_MK, w_NK, out_MN, x_MK, x_MK, x_MK, num_rows, n, k, x_MK.stride(0), 0, w_NK.stride(0), out_MN.stride(0),
        GROUPED=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=MM_BLOCK_K, PRECISION=precision(x_MK),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out_MN


def dense_tiles(num_rows: int, num_cols: int, sms: int) -> tuple[int, int, int, int]:
    """(block_m, block_n, warps, stages) of a dense product of `num_rows` x `num_cols` outputs on a card of `sms`
    SMs (`MM_FEW_ROWS`, `MM_SMALL_GRID`); the K step is always `MM_BLOCK_K`, so every choice keeps a row's bits."""
    for max_rows, tiles in MM_FEW_ROWS:
        if num_rows <= max_rows:
            return tiles
    if -(-num_rows // MM_BLOCK_M) * -(-num_cols // MM_BLOCK_N) < sms:
        return MM_SMALL_GRID
    return MM_BLOCK_M, MM_BLOCK_N, MM_WARPS, MM_STAGES


def grouped_mm_triton(x_NI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    x_NI, w_EOI = x_NI.contiguous(), w_EOI.contiguous()
    (num_rows, k), (num_experts, n, _) = x_NI.shape, w_EOI.shape
    out_NO = x_NI.new_empty(num_rows, n)
    if num_rows == 0:
        return out_NO
    offs_E = offs_E.long()
    starts_E = torch.cat([offs_E.new_zeros(1), offs_E[:-1]])
    max_tiles = triton.cdiv(num_rows, MM_BLOCK_M) + num_experts
    expert_T, row0_T = tile_table(offs_E - starts_E, MM_BLOCK_M, max_tiles)
    safe_T = expert_T.clamp(min=0).long()
    row0_T = (row0_T + starts_E[safe_T]).to(torch.int32)
    row_end_T = offs_E[safe_T].to(torch.int32)
    grid = (triton.cdiv(n, MM_BLOCK_N), max_tiles)
    _matmul_nt_kernel[grid](
        x_NI, w_EOI, out_NO, expert_T, row0_T, row_end_T, num_rows, n, k,
        x_NI.stride(0), w_EOI.stride(0), w_EOI.stride(1), out_NO.stride(0),
        GROUPED=True, BLOCK_M=MM_BLOCK_M, BLOCK_N=MM_BLOCK_N, BLOCK_K=MM_BLOCK_K, PRECISION=precision(x_NI),
        num_warps=MM_WARPS, num_stages=MM_STAGES,
    )  # fmt: skip
    return out_NO


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x_RD = x.reshape(-1, x.shape[-1]).contiguous()
    out_RD = torch.empty(x_RD.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x_RD.shape[0]:
        block = triton.next_power_of_2(x_RD.shape[1])
        _rms_norm_kernel[(x_RD.shape[0],)](
            x_RD, weight.contiguous(), out_RD, x_RD.shape[1], x_RD.stride(0), out_RD.stride(0), eps,
            BLOCK_D=block, num_warps=min(16, max(4, block // 256)),
        )  # fmt: skip
    return out_RD.view(*x.shape[:-1], x.shape[-1])


def add_rms_norm_triton(x, y, weight, eps: float):
    """`add_rms_norm_reference` in one launch: y of x's shape and dtype, or x's pair outputs [..., K, D] float32."""
    x_RD = x.reshape(-1, x.shape[-1]).contiguous()
    pairs = y.dim() == x.dim() + 1
    y_RKD = y.reshape(x_RD.shape[0], -1, x.shape[-1]).contiguous()  # K = 1 for y of x's shape
    sum_RD = torch.empty(x_RD.shape, dtype=x.dtype, device=x.device)
    out_RD = torch.empty(x_RD.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x_RD.shape[0]:
        block = triton.next_power_of_2(x_RD.shape[1])
        _add_rms_norm_kernel[(x_RD.shape[0],)](
            x_RD, y_RKD, weight.contiguous(), sum_RD, out_RD, x_RD.shape[1], x_RD.stride(0), y_RKD.stride(0),
            y_RKD.stride(1), sum_RD.stride(0), out_RD.stride(0), eps, K=y_RKD.shape[1] if pairs else 0,
            BLOCK_D=block, num_warps=min(16, max(4, block // 256)),
        )  # fmt: skip
    return sum_RD.view(x.shape), out_RD.view(x.shape)


def norm_rope_triton(q_THA, k_TGA, cos_TA, sin_TA, q_weight_A=None, k_weight_A=None, eps: float = 0.0):
    """`norm_rope_reference` in one launch: (q, k) contiguous, in q's dtype. Inputs may be strided views (the
    heads of one fused q/k/v product) whose last axis is contiguous."""
    (num_tokens, num_heads, head_dim), num_kv_heads = q_THA.shape, k_TGA.shape[1]
    if head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError(f"norm_rope_triton: head_dim {head_dim} must be a power of two")
    if q_THA.stride(-1) != 1 or k_TGA.stride(-1) != 1:
        q_THA, k_TGA = q_THA.contiguous(), k_TGA.contiguous()
    cos_TA, sin_TA = cos_TA.contiguous(), sin_TA.contiguous()
    q_out, k_out = torch.empty(q_THA.shape, dtype=q_THA.dtype, device=q_THA.device), torch.empty_like(k_TGA)
    norm = q_weight_A is not None
    if num_tokens:
        q_w, k_w = (q_weight_A.contiguous(), k_weight_A.contiguous()) if norm else (q_THA, k_TGA)
        _norm_rope_kernel[(num_tokens, num_heads + num_kv_heads)](
            q_THA, k_TGA, q_out, k_out, q_w, k_w, cos_TA, sin_TA, num_heads, num_kv_heads,
            q_THA.stride(0), q_THA.stride(1), k_TGA.stride(0), k_TGA.stride(1), cos_TA.stride(0), sin_TA.stride(0),
            eps, A=head_dim, NORM=norm, num_warps=1, enable_fp_fusion=False,
        )  # fmt: skip
    return q_out, k_out


def logsumexp_triton(x_RV: torch.Tensor) -> torch.Tensor:
    x_RV = x_RV.float().contiguous()
    out_R = x_RV.new_empty(x_RV.shape[0])
    if x_RV.shape[0]:
        _logsumexp_kernel[(x_RV.shape[0],)](x_RV, out_R, x_RV.shape[1], x_RV.stride(0), BLOCK=ROW_BLOCK, num_warps=8)
    return out_R


# ---------------------------------------------------------------------------------------------- autograd


class _Linear(torch.autograd.Function):
    """Invariant forward; the backward is the ordinary one (two library matmuls)."""

    @staticmethod
    def forward(ctx, x_MK, w_NK):
        ctx.save_for_backward(x_MK, w_NK)
        return matmul_nt_triton(x_MK, w_NK)

    @staticmethod
    def backward(ctx, grad_MN):
        x_MK, w_NK = ctx.saved_tensors
        grad_x = grad_MN @ w_NK.to(grad_MN.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_MN.T @ x_MK.to(grad_MN.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


class _Recompute(torch.autograd.Function):
    """Invariant forward `fast(*inputs)` (a tensor or a tuple of tensors); the backward differentiates
    `reference(*inputs)`, recomputed."""

    @staticmethod
    def forward(ctx, fast, reference, *inputs):
        ctx.reference = reference
        ctx.save_for_backward(*(t if isinstance(t, torch.Tensor) else None for t in inputs))
        ctx.others = [None if isinstance(t, torch.Tensor) else t for t in inputs]
        return fast(*inputs)

    @staticmethod
    def backward(ctx, *grads_out):
        inputs = [t if t is not None else o for t, o in zip(ctx.saved_tensors, ctx.others, strict=True)]
        wanted = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and ctx.needs_input_grad[i + 2]]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(i in wanted) if isinstance(t, torch.Tensor) else t
                      for i, t in enumerate(inputs)]  # fmt: skip
            out = ctx.reference(*leaves)
            outs = out if isinstance(out, tuple) else (out,)
            grads = torch.autograd.grad(outs, [leaves[i] for i in wanted], grads_out, allow_unused=True)
        result = [None] * len(inputs)
        for i, g in zip(wanted, grads, strict=True):
            result[i] = g
        return None, None, *result


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def recompute(fast, reference, *inputs):
    return _Recompute.apply(fast, reference, *inputs) if _needs_grad(*inputs) else fast(*inputs)


# ---------------------------------------------------------------------------------------------- public face


def matmul_nt(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x @ w.T, row-invariant (differentiable)."""
    if not uses_triton(x_MK):
        return matmul_nt_reference(x_MK, w_NK)
    return _Linear.apply(x_MK, w_NK) if _needs_grad(x_MK, w_NK) else matmul_nt_triton(x_MK, w_NK)


def linear(x: torch.Tensor, weight_NK: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    out = matmul_nt(x.reshape(-1, x.shape[-1]), weight_NK).reshape(*x.shape[:-1], weight_NK.shape[0])
    return out if bias_N is None else out + bias_N


def grouped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Each expert's sorted rows times its weight, row-invariant (see `grouped_gemm.grouped_mm_reference`)."""
    if uses_triton(x_NI):
        return recompute(grouped_mm_triton, ordinary_grouped_mm, x_NI, w_EOI, offs_E)
    bounds = [0, *offs_E.tolist()]
    outs = [matmul_nt_reference(x_NI[bounds[e] : bounds[e + 1]], w_EOI[e]) for e in range(w_EOI.shape[0])]
    return torch.cat(outs, dim=0) if outs else x_NI.new_empty(0, w_EOI.shape[1])


def moe_route(x_TD, w_ED, bias_E, top_k: int, renormalize: bool, replay_ids_TK, reference):
    """The router on CUDA (`fused_moe.route_triton`): (weights_TK float32, ids_TK, logits_TE), the same per
    token whatever the batch; `replay_ids_TK` gives the experts. With gradients the weights' backward
    differentiates `reference(x, w, ids)` (recomputed), and the logits are `F.linear`'s (auxiliary losses only:
    they are not part of the invariant forward)."""
    with torch.no_grad():
        weights_TK, ids_TK, logits_TE = fused_moe.route_triton(x_TD, w_ED, bias_E, top_k, renormalize, replay_ids_TK)
    if _needs_grad(x_TD, w_ED):

        def fast(x, w, ids):  # the replayed weights are the chosen ones bit for bit (`route_triton`)
            return fused_moe.route_triton(x, w, bias_E, top_k, renormalize, ids)[0]

        weights_TK = _Recompute.apply(fast, reference, x_TD, w_ED, ids_TK)
        logits_TE = torch.nn.functional.linear(x_TD, w_ED)
    return weights_TK, ids_TK, logits_TE


def moe_experts(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF, reference):
    """Each token's weighted expert outputs summed, on CUDA: `fused_moe`'s tiled kernels at any size (training
    batches align their pairs by a sort), the top-k sum in index order in float32, one rounding to x's dtype.
    With gradients the backward differentiates `reference(x, weights, ids, w13, w2)`, recomputed."""

    def fast(x, weights, ids, w13, w2):
        pairs = fused_moe.pairs_tiled_triton(x, weights, ids, w13, w2, **fused_moe.invariant_tiles(ids.numel()))
        return fused_moe.sum_pairs_triton(pairs, x.dtype)

    return recompute(fast, reference, x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF)


def moe_pairs(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF) -> torch.Tensor:
    """Each (token, expert) pair's weighted output [T, K, D] float32 (inference, CUDA): `moe_experts` before its
    top-k sum, which `add_rms_norm` then does in the next block's add-and-norm launch (the same arithmetic)."""
    return fused_moe.pairs_tiled_triton(
        x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF, **fused_moe.invariant_tiles(ids_TK.numel())
    )


def moe_rows(x_RD, ids_R, w13_EFD, w2_EDF, reference):
    """Rows of one expert each (the rows expert parallelism receives), on CUDA: float32 [R, D] before any
    routing weight, the dot products `moe_experts` computes for the same (token, expert) pair. With gradients
    the backward differentiates `reference(x, ids, w13, w2)`, recomputed."""

    def fast(x, ids, w13, w2):
        ones_R1 = torch.ones(ids.shape[0], 1, device=x.device)
        return fused_moe.pairs_tiled_triton(
            x, ones_R1, ids[:, None], w13, w2, **fused_moe.invariant_tiles(ids.numel())
        )[:, 0]

    return recompute(fast, reference, x_RD, ids_R, w13_EFD, w2_EDF)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not uses_triton(x):
        return rms_norm_reference(x, weight, eps)
    return recompute(rms_norm_triton, rms_norm_reference, x, weight, eps)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(x + y, RMSNorm of x + y), row-invariant: the residual add and the next norm in one launch on CUDA
    (differentiable through `add_rms_norm_reference`), the reference elsewhere. y None: (x, the norm of x)."""
    if y is None:
        return x, rms_norm(x, weight, eps)
    if not uses_triton(x):
        return add_rms_norm_reference(x, y, weight, eps)
    return recompute(add_rms_norm_triton, add_rms_norm_reference, x, y, weight, eps)


@torch.library.custom_op("leagues::add_pairs_rms_norm", mutates_args=())
def add_pairs_rms_norm(
    x_TD: torch.Tensor, pairs_TKD: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + the sum of a token's pair outputs, RMSNorm of it), for inference: the tiled MoE's float32 pair outputs
    summed in index order, the residual add and the next norm in one launch on CUDA (an operator, so a compiled
    block calls the kernel as it is), the reference elsewhere."""
    if uses_triton(x_TD):
        return add_rms_norm_triton(x_TD, pairs_TKD, weight, eps)
    return add_rms_norm_reference(x_TD, pairs_TKD, weight, eps)


@add_pairs_rms_norm.register_fake
def _(x_TD, pairs_TKD, weight, eps):
    return torch.empty_like(x_TD), x_TD.new_empty(x_TD.shape, dtype=torch.promote_types(x_TD.dtype, weight.dtype))


def norm_rope(q_THA, k_TGA, cos_TA, sin_TA, q_weight_A=None, k_weight_A=None, eps: float = 0.0):
    """Per-head RMSNorm of q and k (when their weights are given) and rotary, row-invariant: one launch on CUDA
    (differentiable: the backward differentiates `norm_rope_reference`, recomputed), the reference elsewhere."""
    if not uses_triton(q_THA):
        return norm_rope_reference(q_THA, k_TGA, cos_TA, sin_TA, q_weight_A, k_weight_A, eps)
    return recompute(norm_rope_triton, norm_rope_reference, q_THA, k_TGA, cos_TA, sin_TA, q_weight_A, k_weight_A, eps)


def logsumexp(x_RV: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last axis of a 2-D float tensor, row-invariant."""
    if not uses_triton(x_RV):
        return torch.logsumexp(x_RV.float(), dim=-1)
    return recompute(logsumexp_triton, lambda x: torch.logsumexp(x.float(), dim=-1), x_RV)


def log_softmax(x_RV: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over the last axis, row-invariant (x - logsumexp(x) on CUDA)."""
    if not uses_triton(x_RV):
        return torch.log_softmax(x_RV.float(), dim=-1)
    x_RV = x_RV.float()
    return x_RV - logsumexp(x_RV)[:, None]


def softmax(x_RV: torch.Tensor) -> torch.Tensor:
    """float32 softmax over the last axis, row-invariant."""
    if not uses_triton(x_RV):
        return torch.softmax(x_RV, dim=-1, dtype=torch.float32)
    return log_softmax(x_RV).exp()


def sum_rows(x_TKD: torch.Tensor) -> torch.Tensor:
    """Sum over axis 1 added in index order, one elementwise add at a time (a library reduction may change
    its tree with the number of rows)."""
    out = x_TKD[:, 0]
    for i in range(1, x_TKD.shape[1]):
        out = out + x_TKD[:, i]
    return out
