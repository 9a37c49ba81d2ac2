"""Attention over a paged KV cache: decode (one query token per sequence) and prefill/extend.

The engine keeps, per layer, `k_cache_NSGA` and `v_cache_NSGA` (views `kv[0, layer]`, `kv[1, layer]` of one
contiguous `[2, L, N, S, G, A]` tensor). Token j of sequence b lives in block `block_tables_BM[b, j // S]`,
row `j % S`; its flat slot is `block * S + row`. `context_lens_B` counts each sequence's valid tokens (>= 1).

Decisions:
- Every kernel sits beside a pure-torch reference that is simple enough to be obviously right (a loop over
  sequences, softmax in float32); tests compare the two, and the engine runs the references on the CPU.
- Decode kernel: grid `(B, G, num_splits)`. One program owns a sequence and a KV head and computes the whole
  GQA group of query heads, so each K/V tile is read once per group. The group is padded to >= 16 rows
  (`tl.dot` wants M >= 16); padded rows load zeros and are never stored. Tiles are `[BLOCK_N tokens, A]`,
  gathered token by token through the block table, so `BLOCK_N` need not match the block size. Softmax is
  online (flash) in float32, in base 2 with the scale folded into one multiply.
- float32 inputs use `input_precision="ieee"` dots (no tf32), so the kernel matches the reference to ~1e-6.
- CUDA-graph safe: no `.item()`, no host sync, and every allocation depends on shapes only.
- Split-K (flash-decoding) for long contexts with few sequences: `split_tokens` is a fixed token count per
  split, so the number of splits (`ceil(max_blocks * S / split_tokens)`) depends on the block table's shape
  only, and the order of the reduction for a sequence depends on its own length only. Both paths are
  batch-invariant for given launch settings, but the split and the one-pass paths differ from each other in the
  last bits, and the launch's key tile follows the grid's size (`decode_tiles`), so a sequence's last bits may
  change with the number of sequences beside it. Deterministic mode runs its own kernel
  (`leagues.kernels.invariant_attention`).
- Prefill over paged KV runs FlashAttention varlen on CUDA (in the model's attention backend) on KV packed by
  `gather_kv`; here is its reference, which the engine also runs on the CPU.

Legend: B sequences, H query heads, G kv heads, A head dim, N cache blocks, S block size (tokens per block),
M max blocks per sequence (block-table width), T tokens (packed), K keys of one sequence, Q queries of one
sequence, P splits (split-K).
"""

import torch

from leagues.kernels import num_sms

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the reference path needs none
    triton = None

LOG2E = 1.4426950408889634
IMPLS = ("auto", "triton", "reference")


# ---------------------------------------------------------------------------------------------- cache writes


def write_kv(
    k_cache_NSGA: torch.Tensor, v_cache_NSGA: torch.Tensor, k_TGA: torch.Tensor, v_TGA: torch.Tensor, slots_T
) -> None:
    """Store new keys/values at flat slots (`block * S + row`, int64 [T]); in place, graph-capturable. On CUDA
    one launch writes both (`write_kv_triton`: a layer of a decode step is launch-bound)."""
    if triton is not None and k_TGA.is_cuda:
        write_kv_triton(k_cache_NSGA, v_cache_NSGA, k_TGA, v_TGA, slots_T)
    else:
        write_kv_reference(k_cache_NSGA, v_cache_NSGA, k_TGA, v_TGA, slots_T)


def write_kv_reference(k_cache_NSGA, v_cache_NSGA, k_TGA, v_TGA, slots_T) -> None:
    k_cache_NSGA.view(-1, *k_cache_NSGA.shape[2:]).index_copy_(0, slots_T, k_TGA.to(k_cache_NSGA.dtype))
    v_cache_NSGA.view(-1, *v_cache_NSGA.shape[2:]).index_copy_(0, slots_T, v_TGA.to(v_cache_NSGA.dtype))


def write_kv_triton(k_cache_NSGA, v_cache_NSGA, k_TGA, v_TGA, slots_T) -> None:
    """`write_kv_reference` in one launch: a program a token copies its key and value rows (CUDA, or the CPU
    under TRITON_INTERPRET=1). The caches are `[N, S, G, A]` views of one contiguous tensor."""
    num_tokens, num_kv_heads, head_dim = k_TGA.shape
    row = num_kv_heads * head_dim
    k_TGA, v_TGA = _rows_contiguous(k_TGA), _rows_contiguous(v_TGA)
    if num_tokens:
        _write_kv_kernel[(num_tokens,)](
            k_TGA, v_TGA, slots_T, k_cache_NSGA, v_cache_NSGA, k_TGA.stride(0), v_TGA.stride(0), row,
            ROW_PAD=triton.next_power_of_2(row), num_warps=1 if row <= 512 else 4,
        )  # fmt: skip


def _rows_contiguous(x_TGA: torch.Tensor) -> torch.Tensor:
    """Each token's [G, A] dense (a column slice of the fused q/k/v projection is; its rows may be apart)."""
    dense = x_TGA.stride(2) == 1 and x_TGA.stride(1) == x_TGA.shape[2]
    return x_TGA if dense else x_TGA.contiguous()


def key_slots(
    block_tables_BM: torch.Tensor, context_lens_B: torch.Tensor, block_size: int, total_keys: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat cache slot of every key of every sequence, packed in sequence order (int64 [S]), and
    cu_seqlens_k (int32 [B+1]). The same for every layer of a step: build it once.

    Vectorised on the device. The packed length is data-dependent: given as `total_keys` (the host knows it),
    nothing syncs; else it is read back once.
    """
    lens_B = context_lens_B.long()
    cu_seqlens_k_B1 = torch.nn.functional.pad(lens_B.cumsum(0), (1, 0))
    seq_S = torch.repeat_interleave(torch.arange(len(lens_B), device=lens_B.device), lens_B, output_size=total_keys)
    pos_S = torch.arange(len(seq_S), device=lens_B.device) - cu_seqlens_k_B1[seq_S]
    blocks_S = block_tables_BM[seq_S, pos_S // block_size].long()
    return blocks_S * block_size + pos_S % block_size, cu_seqlens_k_B1.to(torch.int32)


def gather_kv(
    k_cache_NSGA: torch.Tensor,
    v_cache_NSGA: torch.Tensor,
    block_tables_BM: torch.Tensor,
    context_lens_B: torch.Tensor,
    keys: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sequence's cached K/V, packed contiguously: (k_TGA, v_TGA, cu_seqlens_k_B1 int32).

    `keys`: `key_slots` of the step, built once for all layers; without it they are built here (one sync).
    """
    slots_S, cu_seqlens_k_B1 = (
        keys if keys is not None else key_slots(block_tables_BM, context_lens_B, k_cache_NSGA.shape[1])
    )
    k_SGA = k_cache_NSGA.flatten(0, 1)[slots_S]
    v_SGA = v_cache_NSGA.flatten(0, 1)[slots_S]
    return k_SGA, v_SGA, cu_seqlens_k_B1


# ---------------------------------------------------------------------------------------------- references


def _attend(q_QHA, k_KGA, v_KGA, mask_QK, scale: float) -> torch.Tensor:
    """Plain GQA attention in float32 (query head h reads kv head h // group); output in q's dtype."""
    group = q_QHA.shape[1] // k_KGA.shape[1]
    k_KHA = k_KGA.float().repeat_interleave(group, dim=1)
    v_KHA = v_KGA.float().repeat_interleave(group, dim=1)
    scores_HQK = torch.einsum("qha,kha->hqk", q_QHA.float(), k_KHA) * scale
    if mask_QK is not None:
        scores_HQK = scores_HQK.masked_fill(~mask_QK, float("-inf"))
    o_QHA = torch.einsum("hqk,kha->qha", scores_HQK.softmax(dim=-1), v_KHA)
    return o_QHA.to(q_QHA.dtype)


def paged_prefill_reference(
    q_THA: torch.Tensor,
    k_cache_NSGA: torch.Tensor,
    v_cache_NSGA: torch.Tensor,
    block_tables_BM: torch.Tensor,
    cu_seqlens_q_B1: torch.Tensor,
    context_lens_B: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's query tokens, the last q_len of its cached tokens, over its cache."""
    _check_heads(q_THA, k_cache_NSGA)
    k_TGA, v_TGA, cu_seqlens_k_B1 = gather_kv(k_cache_NSGA, v_cache_NSGA, block_tables_BM, context_lens_B)
    cu_q, cu_k = cu_seqlens_q_B1.tolist(), cu_seqlens_k_B1.tolist()
    o_THA = torch.empty_like(q_THA)
    for b in range(len(cu_k) - 1):
        q_QHA = q_THA[cu_q[b] : cu_q[b + 1]]
        num_q, num_k = len(q_QHA), cu_k[b + 1] - cu_k[b]
        # query i sits at absolute position num_k - num_q + i and sees keys 0..that position
        pos_Q = torch.arange(num_k - num_q, num_k, device=q_THA.device)
        mask_QK = torch.arange(num_k, device=q_THA.device)[None, :] <= pos_Q[:, None]
        kv = (k_TGA[cu_k[b] : cu_k[b + 1]], v_TGA[cu_k[b] : cu_k[b + 1]])
        o_THA[cu_q[b] : cu_q[b + 1]] = _attend(q_QHA, *kv, mask_QK, scale)
    return o_THA


_PADDED_MAX_ELEMENTS = 1 << 25
"""Largest [B, H, Q, K] score tensor the padded path builds; beyond it the per-sequence loop runs."""


def paged_attention_padded(
    q_THA: torch.Tensor,
    k_cache_NSGA: torch.Tensor,
    v_cache_NSGA: torch.Tensor,
    block_tables_BM: torch.Tensor,
    cu_seqlens_q_B1: torch.Tensor,
    context_lens_B: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`paged_prefill_reference` (decode: q_len 1) batched over sequences: queries and each sequence's
    cached keys padded to the longest, masked, in float32. Off CUDA this is the fast path (a batch of
    hundreds of short sequences is a few tensor ops, not a Python loop); it falls back to the loop when
    the padded score tensor would be large (one long sequence among many short ones)."""
    _check_heads(q_THA, k_cache_NSGA)
    q_lens, k_lens = cu_seqlens_q_B1.diff().tolist(), context_lens_B.tolist()
    num_seqs, max_q, max_k = len(k_lens), max(q_lens), max(k_lens)
    if num_seqs * q_THA.shape[1] * max_q * max_k > _PADDED_MAX_ELEMENTS:
        args = (block_tables_BM, cu_seqlens_q_B1, context_lens_B, scale)
        return paged_prefill_reference(q_THA, k_cache_NSGA, v_cache_NSGA, *args)
    device, block_size = q_THA.device, k_cache_NSGA.shape[1]
    num_blocks = -(-max_k // block_size)
    blocks_BM = block_tables_BM[:, :num_blocks].long().clamp(min=0)  # unused table entries are masked below
    k_BKGA = k_cache_NSGA[blocks_BM].flatten(1, 2)[:, :max_k]
    v_BKGA = v_cache_NSGA[blocks_BM].flatten(1, 2)[:, :max_k]
    # query i of sequence b sits at absolute position k_len - q_len + i; padded queries are dropped below
    q_lens_B, k_lens_B = torch.tensor(q_lens, device=device), context_lens_B.long()
    row_BQ = torch.arange(max_q, device=device)[None, :]
    valid_BQ = row_BQ < q_lens_B[:, None]
    q_index_BQ = (cu_seqlens_q_B1[:-1].long()[:, None] + row_BQ).clamp(max=q_THA.shape[0] - 1)
    pos_BQ = k_lens_B[:, None] - q_lens_B[:, None] + row_BQ
    mask_BQK = torch.arange(max_k, device=device)[None, None, :] <= pos_BQ[:, :, None]
    group = q_THA.shape[1] // k_cache_NSGA.shape[2]
    q_BQHA = q_THA[q_index_BQ].float()
    k_BKHA = k_BKGA.float().repeat_interleave(group, dim=2)
    # padded key rows may hold anything (NaN in a fresh cache): zero them so 0-weight x garbage stays 0
    valid_BK = torch.arange(max_k, device=device)[None, :] < k_lens_B[:, None]
    v_BKHA = v_BKGA.float().masked_fill(~valid_BK[:, :, None, None], 0.0).repeat_interleave(group, dim=2)
    k_BKHA = k_BKHA.masked_fill(~valid_BK[:, :, None, None], 0.0)
    scores_BHQK = torch.einsum("bqha,bkha->bhqk", q_BQHA, k_BKHA) * scale
    scores_BHQK = scores_BHQK.masked_fill(~mask_BQK[:, None], float("-inf"))
    o_BQHA = torch.einsum("bhqk,bkha->bqha", scores_BHQK.softmax(dim=-1), v_BKHA)
    return o_BQHA[valid_BQ].to(q_THA.dtype)


def paged_decode_reference(
    q_BHA: torch.Tensor,
    k_cache_NSGA: torch.Tensor,
    v_cache_NSGA: torch.Tensor,
    block_tables_BM: torch.Tensor,
    context_lens_B: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over all its cached tokens: prefill with q_len 1 (the mask is all true)."""
    cu_seqlens_q_B1 = torch.arange(len(q_BHA) + 1, device=q_BHA.device, dtype=torch.int32)
    args = (block_tables_BM, cu_seqlens_q_B1, context_lens_B, scale)
    return paged_prefill_reference(q_BHA, k_cache_NSGA, v_cache_NSGA, *args)


def _check_heads(q_XHA: torch.Tensor, k_cache_NSGA: torch.Tensor) -> None:
    num_heads, num_kv_heads = q_XHA.shape[1], k_cache_NSGA.shape[2]
    if num_heads % num_kv_heads or q_XHA.shape[2] != k_cache_NSGA.shape[3]:
        raise ValueError(f"query heads {tuple(q_XHA.shape[1:])} do not fit kv heads {tuple(k_cache_NSGA.shape[2:])}")


# ---------------------------------------------------------------------------------------------- triton kernels

if triton is not None:

    @triton.jit
    def _write_kv_kernel(
        k_ptr, v_ptr, slots_ptr, k_cache_ptr, v_cache_ptr, stride_k, stride_v, ROW, ROW_PAD: tl.constexpr
    ):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        offs = tl.arange(0, ROW_PAD)
        mask = offs < ROW
        k = tl.load(k_ptr + t * stride_k + offs, mask=mask)
        v = tl.load(v_ptr + t * stride_v + offs, mask=mask)
        tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, o_ptr, lse_ptr, k_new_ptr, v_new_ptr, slots_ptr,
        qk_scale,  # softmax scale * log2(e)
        stride_qb, stride_qh, stride_kn, stride_ks, stride_kg, stride_vn, stride_vs, stride_vg, stride_btb,
        stride_ob, stride_oh, stride_op, stride_lb, stride_lh, stride_knb, stride_kng, stride_vnb, stride_vng,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, A: tl.constexpr, S: tl.constexpr,
        BLOCK_N: tl.constexpr, SPLIT_TOKENS: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
        WRITE: tl.constexpr,
    ):  # fmt: skip
        """Program (b, g, p): query heads g*GROUP.. of sequence b over tokens [p*SPLIT_TOKENS, ...) of its cache.
        WRITE: the program whose tokens hold the sequence's last one first stores its new key and value (kv head
        g) at its slot; the barrier makes the stores visible to the program's own loads below."""
        b, g, p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        ctx = tl.load(ctx_ptr + b)
        start, end = 0, ctx
        if SPLIT:
            start = p * SPLIT_TOKENS
            end = tl.minimum(ctx, start + SPLIT_TOKENS)
        offs_m = tl.arange(0, GROUP_PAD)
        offs_a = tl.arange(0, A)
        if WRITE:
            if (start <= ctx - 1) & (ctx - 1 < end):
                slot = tl.load(slots_ptr + b).to(tl.int64)
                block, row = slot // S, slot % S
                k_A = tl.load(k_new_ptr + b * stride_knb + g * stride_kng + offs_a)
                v_A = tl.load(v_new_ptr + b * stride_vnb + g * stride_vng + offs_a)
                k_dst = k_ptr + block * stride_kn + row * stride_ks + g * stride_kg + offs_a
                v_dst = v_ptr + block * stride_vn + row * stride_vs + g * stride_vg + offs_a
                tl.store(k_dst, k_A.to(k_ptr.dtype.element_ty))
                tl.store(v_dst, v_A.to(v_ptr.dtype.element_ty))
            tl.debug_barrier()
        heads_m = g * GROUP + offs_m
        row_ok_m = offs_m < GROUP
        q_ptrs = q_ptr + b * stride_qb + heads_m[:, None] * stride_qh + offs_a[None, :]
        q_MA = tl.load(q_ptrs, mask=row_ok_m[:, None], other=0.0)

        m_M = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_M = tl.zeros([GROUP_PAD], tl.float32)
        acc_MA = tl.zeros([GROUP_PAD, A], tl.float32)
        for tile in range(start, end, BLOCK_N):
            pos_n = tile + tl.arange(0, BLOCK_N)
            ok_n = pos_n < end
            block_n = tl.load(bt_ptr + b * stride_btb + pos_n // S, mask=ok_n, other=0).to(tl.int64)
            row_n = pos_n % S
            k_rows = k_ptr + block_n * stride_kn + row_n * stride_ks + g * stride_kg
            v_rows = v_ptr + block_n * stride_vn + row_n * stride_vs + g * stride_vg
            k_NA = tl.load(k_rows[:, None] + offs_a[None, :], mask=ok_n[:, None], other=0.0)
            v_NA = tl.load(v_rows[:, None] + offs_a[None, :], mask=ok_n[:, None], other=0.0)

            s_MN = tl.dot(q_MA, tl.trans(k_NA), input_precision=PRECISION) * qk_scale
            s_MN = tl.where(ok_n[None, :], s_MN, float("-inf"))
            m_new_M = tl.maximum(m_M, tl.max(s_MN, axis=1))  # finite: a tile's first token is always valid
            alpha_M = tl.exp2(m_M - m_new_M)
            p_MN = tl.exp2(s_MN - m_new_M[:, None])
            l_M = l_M * alpha_M + tl.sum(p_MN, axis=1)
            acc_MA = acc_MA * alpha_M[:, None] + tl.dot(p_MN.to(v_NA.dtype), v_NA, input_precision=PRECISION)
            m_M = m_new_M

        # l >= 1 once any token is seen (the max scores exp2(0)); an empty split has l = 0, m = -inf: o = 0, lse = -inf
        l_M = tl.maximum(l_M, 1.0)
        o_MA = acc_MA / l_M[:, None]
        o_ptrs = o_ptr + b * stride_ob + heads_m[:, None] * stride_oh + p * stride_op + offs_a[None, :]
        tl.store(o_ptrs, o_MA.to(o_ptr.dtype.element_ty), mask=row_ok_m[:, None])
        if SPLIT:  # log2-sum-exp2 of the split's scores
            tl.store(lse_ptr + b * stride_lb + heads_m * stride_lh + p, m_M + tl.log2(l_M), mask=row_ok_m)

    @triton.jit
    def _combine_kernel(
        part_ptr, lse_ptr, o_ptr,
        stride_pb, stride_ph, stride_pp, stride_lb, stride_lh, stride_ob, stride_oh,
        NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, A: tl.constexpr,
    ):  # fmt: skip
        """Program (b, h): merge the splits' partial outputs by their log-sum-exp weights, in split order."""
        b, h = tl.program_id(0), tl.program_id(1)
        offs_p = tl.arange(0, SPLITS_PAD)
        offs_a = tl.arange(0, A)
        ok_p = offs_p < NUM_SPLITS
        lse_P = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_p, mask=ok_p, other=float("-inf"))
        w_P = tl.exp2(lse_P - tl.max(lse_P, axis=0))  # split 0 is never empty, so the max is finite
        part_ptrs = part_ptr + b * stride_pb + h * stride_ph + offs_p[:, None] * stride_pp + offs_a[None, :]
        part_PA = tl.load(part_ptrs, mask=ok_p[:, None], other=0.0)
        o_A = tl.sum(part_PA * w_P[:, None], axis=0) / tl.sum(w_P, axis=0)
        tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_a, o_A.to(o_ptr.dtype.element_ty))


def paged_decode_triton(
    q_BHA: torch.Tensor,
    k_cache_NSGA: torch.Tensor,
    v_cache_NSGA: torch.Tensor,
    block_tables_BM: torch.Tensor,
    context_lens_B: torch.Tensor,
    scale: float,
    *,
    block_n: int | None = None,
    split_tokens: int | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """The Triton decode kernel; `split_tokens` (a multiple of `block_n`) turns on split-K with that split size;
    `block_n` (keys a tile), `num_warps`, `num_stages` (software-pipeline depth): `decode_tiles`' where not given.
    `new_kv` (k_BGA, v_BGA, slots_B): the step's new keys and values, stored at their slots by the kernel itself
    before it reads them (`write_kv` in the same launch: a decode layer is launch-bound)."""
    num_seqs, num_heads, head_dim = q_BHA.shape
    _, block_size, num_kv_heads, _ = k_cache_NSGA.shape
    tiles = decode_tiles(num_seqs * num_kv_heads, split_tokens is not None, q_BHA.device)
    block_n, num_warps, num_stages = block_n or tiles[0], num_warps or tiles[1], num_stages or tiles[2]
    _check_decode_args(q_BHA, k_cache_NSGA, v_cache_NSGA, block_n, split_tokens)
    group = num_heads // num_kv_heads
    split = split_tokens is not None
    num_splits = triton.cdiv(block_tables_BM.shape[1] * block_size, split_tokens) if split else 1
    o_BHA = torch.empty_like(q_BHA)
    # split-K writes float32 partials [B, H, P, A] and their log2-sum-exp2 [B, H, P]; shapes only, no data
    o_BHPA = (
        q_BHA.new_empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32) if split else o_BHA[:, :, None]
    )
    lse_BHP = q_BHA.new_empty(num_seqs, num_heads, num_splits, dtype=torch.float32) if split else o_BHPA  # unused
    if new_kv is None:
        k_new_BGA = v_new_BGA = slots_B = q_BHA  # unused
    else:
        k_new_BGA, v_new_BGA, slots_B = new_kv
        if k_new_BGA.stride(2) != 1 or v_new_BGA.stride(2) != 1 or len(slots_B) != num_seqs:
            raise ValueError("new_kv: keys and values contiguous in the head dim, one slot a sequence")
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q_BHA, k_cache_NSGA, v_cache_NSGA, block_tables_BM, context_lens_B, o_BHPA, lse_BHP,
        k_new_BGA, v_new_BGA, slots_B, scale * LOG2E,
        q_BHA.stride(0), q_BHA.stride(1), *k_cache_NSGA.stride()[:3], *v_cache_NSGA.stride()[:3],
        block_tables_BM.stride(0), *o_BHPA.stride()[:3], *lse_BHP.stride()[:2],
        *k_new_BGA.stride()[:2], *v_new_BGA.stride()[:2],
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), A=head_dim, S=block_size,
        BLOCK_N=block_n, SPLIT_TOKENS=split_tokens or block_n, SPLIT=split,
        PRECISION="ieee" if q_BHA.dtype == torch.float32 else "tf32", WRITE=new_kv is not None,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if split:
        _combine_kernel[(num_seqs, num_heads)](
            o_BHPA, lse_BHP, o_BHA, *o_BHPA.stride()[:3], *lse_BHP.stride()[:2], *o_BHA.stride()[:2],
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), A=head_dim,
        )  # fmt: skip
    return o_BHA


def _check_decode_args(q_BHA, k_cache_NSGA, v_cache_NSGA, block_n: int, split_tokens: int | None) -> None:
    if triton is None:
        raise RuntimeError("paged_decode_triton needs triton, which is not installed")
    _check_heads(q_BHA, k_cache_NSGA)
    head_dim = q_BHA.shape[2]
    if head_dim & (head_dim - 1) or head_dim < 16 or block_n & (block_n - 1) or block_n < 16:
        raise ValueError(f"head_dim ({head_dim}) and block_n ({block_n}) must be powers of two >= 16")
    if k_cache_NSGA.stride(3) != 1 or v_cache_NSGA.stride(3) != 1 or q_BHA.stride(2) != 1:
        raise ValueError("q and the caches must be contiguous in the head dim")
    if split_tokens is not None and (split_tokens % block_n or split_tokens <= 0):
        raise ValueError(f"split_tokens ({split_tokens}) must be a positive multiple of block_n ({block_n})")


# ---------------------------------------------------------------------------------------------- dispatch


def decode_tiles(num_programs: int, split: bool, device: torch.device) -> tuple[int, int, int]:
    """(keys a tile, warps, pipeline stages) of a decode launch of `num_programs` (sequence, KV head) programs,
    measured on an H100 (`benchmarks/decode_tune.py`, 16/4 heads of 64, 128 and 1,088 keys): with several
    programs an SM (256 sequences) small one-warp programs, 28% faster than 64-key tiles of 4 warps at 3 stages
    (9.8 against 13.6 us at 128 keys, 100 against 129 at 1,088); with fewer (64 sequences) 128-key tiles, 10%
    faster at 1,088 keys; split-K launches keep 64-key tiles (their splits are multiples of 64), 2 stages."""
    if split:
        return 64, 4, 2
    if num_programs >= 4 * num_sms(device):
        return 32, 1, 2
    return 128, 4, 2


def decode_split_tokens(
    num_seqs: int, num_kv_heads: int, max_tokens: int, num_sms: int, block_n: int = 64
) -> int | None:
    """Split-K's split size for a decode of `num_seqs` sequences over at most `max_tokens` keys each: when the
    one-pass grid (a program per sequence and KV head) fills fewer than `num_sms` SMs, enough splits to fill
    them, each a multiple of `block_n`; None when one pass fills the card or the keys fit in one split."""
    programs = num_seqs * num_kv_heads
    if programs >= num_sms:
        return None
    splits = -(-num_sms // programs)
    split = -(-max_tokens // (splits * block_n)) * block_n
    return split if split < max_tokens else None


def paged_decode(
    q_BHA: torch.Tensor,
    k_cache_NSGA: torch.Tensor,
    v_cache_NSGA: torch.Tensor,
    block_tables_BM: torch.Tensor,
    context_lens_B: torch.Tensor,
    scale: float,
    impl: str = "auto",
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    **kernel_options,
) -> torch.Tensor:
    """Dispatch: "auto" (the kernel on CUDA, the reference elsewhere), "triton" (CPU only under
    TRITON_INTERPRET=1) or "reference". `kernel_options` (`block_n`, `split_tokens`) go to the kernel.
    `new_kv` (k_BGA, v_BGA, slots_B): the step's new keys and values, written to the cache first (by the kernel
    itself on the Triton path)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    args = (q_BHA, k_cache_NSGA, v_cache_NSGA, block_tables_BM, context_lens_B, scale)
    if impl == "triton" or (impl == "auto" and q_BHA.is_cuda and triton is not None):
        if new_kv is not None:  # the kernel reads rows of G x A contiguous in A
            new_kv = (*(x if x.stride(2) == 1 else x.contiguous() for x in new_kv[:2]), new_kv[2])
        return paged_decode_triton(*args, new_kv=new_kv, **kernel_options)
    if new_kv is not None:
        write_kv(k_cache_NSGA, v_cache_NSGA, *new_kv)
    if impl == "auto":
        cu_seqlens_q_B1 = torch.arange(len(q_BHA) + 1, device=q_BHA.device, dtype=torch.int32)
        return paged_attention_padded(
            q_BHA, k_cache_NSGA, v_cache_NSGA, block_tables_BM, cu_seqlens_q_B1, context_lens_B, scale
        )
    return paged_decode_reference(*args)
