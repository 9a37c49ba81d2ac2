"""Batch-invariant causal attention for deterministic mode, over keys addressed through a table, so the trainer
(packed sequences) and the engine (a paged KV cache) run the same compiled kernel and a query gets the same bits in
training, in a prefill chunk and in a decode step.

Decisions:
- Each query walks its keys from position 0 in fixed 64-key blocks with an online softmax, so it sees the same
  block boundaries however the batch is cut; blocks past its position are masked to exact no-ops.
- Keys are addressed through a table (`slot = table[b, j // S] * S + j % S`): the engine passes its paged block
  table, the trainer its packed keys with S = 1.
- Nothing syncs with the host: the tile count is an upper bound from shapes, and tiles past the end return.
- The CPU reference pads every sequence's keys to one fixed length, so every row reduces over the same length.
- Only the forward is invariant; the backward recomputes with the ordinary differentiable attention.

Legend: Q queries, P padded keys, H query heads, G kv heads, A head dim, B sequences, T tokens, S key-table block
size (slots of the flattened cache), M rows of a table.
"""

import torch

from leagues.kernels.batch_invariant import LOG2E, precision, recompute, tile_table

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the CPU reference needs none
    triton = None

ATT_BLOCK_M, ATT_BLOCK_N, ATT_WARPS = 64, 64, 4
ATT_STAGES = 2
"""Software-pipeline depth of the attention launch: it reorders loads, not arithmetic, so any depth keeps the bits.
Two, not Triton's default three: the paged decode kernel of the same shape ran 19% faster at 256 sequences with two
(`benchmarks/decode_tune.py`, H100)."""


def attention_reference(
    q_QHA: torch.Tensor, k_KGA: torch.Tensor, v_KGA: torch.Tensor, pos_Q: torch.Tensor, pad_to: int, scale: float
) -> torch.Tensor:
    """Causal attention of one sequence's queries (at absolute positions `pos_Q`) over its keys 0..K-1,
    keys padded to `pad_to` so every row reduces over the same length."""
    num_keys, group = k_KGA.shape[0], q_QHA.shape[1] // k_KGA.shape[1]
    if num_keys > pad_to:
        raise ValueError(f"sequence of {num_keys} tokens exceeds the deterministic attention length {pad_to}")
    pad = (0, 0, 0, 0, 0, pad_to - num_keys)
    k_PHA = torch.nn.functional.pad(k_KGA.float(), pad).repeat_interleave(group, dim=1)
    v_PHA = torch.nn.functional.pad(v_KGA.float(), pad).repeat_interleave(group, dim=1)
    q_HQA, k_HPA, v_HAP = q_QHA.float().transpose(0, 1), k_PHA.transpose(0, 1), v_PHA.permute(1, 2, 0)
    scores_HQP = (q_HQA[:, :, None, :] * k_HPA[:, None, :, :]).sum(dim=-1) * scale
    mask_QP = torch.arange(pad_to, device=q_QHA.device)[None, :] <= pos_Q[:, None]
    probs_HQP = scores_HQP.masked_fill(~mask_QP[None], float("-inf")).softmax(dim=-1)
    out_HQA = (probs_HQP[:, :, None, :] * v_HAP[:, None, :, :]).sum(dim=-1)
    return out_HQA.transpose(0, 1).to(q_QHA.dtype)


if triton is not None:

    @triton.jit(do_not_specialize=["block_size"])
    def _attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, table_ptr, cu_q_ptr, key_lens_ptr, tile_seq_ptr, tile_row0_ptr,
        stride_qt, stride_qh, stride_ks, stride_kg, stride_vs, stride_vg, stride_ot, stride_oh, stride_tb,
        block_size, qk_scale, k_new_ptr, v_new_ptr, slots_ptr, stride_knt, stride_kng, stride_vnt, stride_vng,
        GROUP: tl.constexpr, A: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, WRITE: tl.constexpr,
    ):  # fmt: skip
        """Program (tile, g): BLOCK_M rows (query token, head of kv head g's group) of one sequence, over
        that sequence's keys 0.. in BLOCK_N blocks. Sequence b's queries are the last ones of its keys.
        WRITE (decode steps: one query a sequence, so one tile): the program first stores the sequence's new key
        and value of kv head g at its slot; the barrier makes the stores visible to its own loads below."""
        tile, g = tl.program_id(0), tl.program_id(1)
        b = tl.load(tile_seq_ptr + tile)
        if b < 0:  # past the last tile (the grid is an upper bound, so no host sync sizes it)
            return
        row0 = tl.load(tile_row0_ptr + tile)
        q_start = tl.load(cu_q_ptr + b)
        num_q = tl.load(cu_q_ptr + b + 1) - q_start
        num_k = tl.load(key_lens_ptr + b)
        rows_m = row0 + tl.arange(0, BLOCK_M)
        tok_m = rows_m // GROUP
        head_m = g * GROUP + rows_m % GROUP
        ok_m = tok_m < num_q
        pos_m = num_k - num_q + tok_m
        offs_a = tl.arange(0, BLOCK_A)
        ok_a = offs_a < A
        if WRITE:
            slot = tl.load(slots_ptr + q_start).to(tl.int64)
            k_A = tl.load(k_new_ptr + q_start * stride_knt + g * stride_kng + offs_a, mask=ok_a)
            v_A = tl.load(v_new_ptr + q_start * stride_vnt + g * stride_vng + offs_a, mask=ok_a)
            tl.store(k_ptr + slot * stride_ks + g * stride_kg + offs_a, k_A.to(k_ptr.dtype.element_ty), mask=ok_a)
            tl.store(v_ptr + slot * stride_vs + g * stride_vg + offs_a, v_A.to(v_ptr.dtype.element_ty), mask=ok_a)
            tl.debug_barrier()
        q_ptrs = q_ptr + (q_start + tok_m).to(tl.int64)[:, None] * stride_qt + head_m[:, None] * stride_qh
        q_MA = tl.load(q_ptrs + offs_a[None, :], mask=ok_m[:, None] & ok_a[None, :], other=0.0)

        last_tok = tl.minimum(row0 + BLOCK_M - 1, num_q * GROUP - 1) // GROUP
        hi = num_k - num_q + last_tok + 1  # keys past the tile's last query are never visible
        m_M = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_M = tl.zeros([BLOCK_M], tl.float32)
        acc_MA = tl.zeros([BLOCK_M, BLOCK_A], tl.float32)
        for start in range(0, hi, BLOCK_N):
            pos_n = start + tl.arange(0, BLOCK_N)
            ok_n = pos_n < num_k
            block_n = tl.load(table_ptr + b * stride_tb + pos_n // block_size, mask=ok_n, other=0).to(tl.int64)
            slot_n = block_n * block_size + pos_n % block_size
            k_NA = tl.load(
                k_ptr + slot_n[:, None] * stride_ks + g * stride_kg + offs_a[None, :],
                mask=ok_n[:, None] & ok_a[None, :],
                other=0.0,
            )
            s_MN = tl.dot(q_MA, tl.trans(k_NA), input_precision=PRECISION) * qk_scale
            s_MN = tl.where((pos_n[None, :] <= pos_m[:, None]) & ok_n[None, :], s_MN, float("-inf"))
            # key 0 is visible to every row, so m is finite from the first block on; a block with no visible
            # key for a row leaves its m, l and acc exactly unchanged (alpha = 1, p = 0)
            m_new_M = tl.maximum(m_M, tl.max(s_MN, axis=1))
            alpha_M = tl.exp2(m_M - m_new_M)
            p_MN = tl.exp2(s_MN - m_new_M[:, None])
            l_M = l_M * alpha_M + tl.sum(p_MN, axis=1)
            v_NA = tl.load(
                v_ptr + slot_n[:, None] * stride_vs + g * stride_vg + offs_a[None, :],
                mask=ok_n[:, None] & ok_a[None, :],
                other=0.0,
            )
            acc_MA = acc_MA * alpha_M[:, None] + tl.dot(p_MN.to(v_NA.dtype), v_NA, input_precision=PRECISION)
            m_M = m_new_M
        o_MA = acc_MA / l_M[:, None]
        o_ptrs = o_ptr + (q_start + tok_m).to(tl.int64)[:, None] * stride_ot + head_m[:, None] * stride_oh
        tl.store(o_ptrs + offs_a[None, :], o_MA.to(o_ptr.dtype.element_ty), mask=ok_m[:, None] & ok_a[None, :])


def attention_tiles(cu_q_B1: torch.Tensor, num_tokens: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention kernel's tiles (sequence, first row) for a batch of `num_tokens` queries: rows are
    (query, head of the group); the tile count is an upper bound from shapes, so nothing syncs."""
    max_tiles = triton.cdiv(num_tokens * group, ATT_BLOCK_M) + len(cu_q_B1) - 1
    return tile_table((cu_q_B1[1:] - cu_q_B1[:-1]).long() * group, ATT_BLOCK_M, max_tiles)


def attention_triton(
    q_THA: torch.Tensor,
    k_SGA: torch.Tensor,
    v_SGA: torch.Tensor,
    cu_q_B1: torch.Tensor,
    key_lens_B: torch.Tensor,
    table_BM: torch.Tensor,
    block_size: int,
    scale: float,
    tiles: tuple[torch.Tensor, torch.Tensor] | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries over keys addressed through a table (see the module notes): the
    queries of sequence b (tokens cu_q[b]:cu_q[b+1]) are the last of its key_lens[b] keys. No host sync.
    `tiles`: `attention_tiles` of this batch, computed once for all layers. `new_kv` (k_TGA, v_TGA, slots_T), for
    a decode step (one query a sequence) only: the kernel stores each sequence's new key and value at its slot
    before reading (one launch instead of a cache write and the attention)."""
    num_tokens, num_heads, head_dim = q_THA.shape
    num_kv_heads = k_SGA.shape[1]
    group = num_heads // num_kv_heads
    q_THA = q_THA if q_THA.stride(-1) == 1 else q_THA.contiguous()
    o_THA = torch.empty_like(q_THA)
    if num_tokens == 0:
        return o_THA
    seq_T, row0_T = tiles if tiles is not None else attention_tiles(cu_q_B1, num_tokens, group)
    if new_kv is not None and group > ATT_BLOCK_M:
        raise ValueError(f"attention_triton: new_kv needs one tile a decode row ({group} heads a group)")
    k_new, v_new, slots = new_kv if new_kv is not None else (k_SGA, v_SGA, seq_T)
    k_new, v_new = (x if x.stride(-1) == 1 else x.contiguous() for x in (k_new, v_new))
    _attention_kernel[(len(seq_T), num_kv_heads)](
        q_THA, k_SGA, v_SGA, o_THA, table_BM, cu_q_B1, key_lens_B, seq_T, row0_T,
        q_THA.stride(0), q_THA.stride(1), k_SGA.stride(0), k_SGA.stride(1), v_SGA.stride(0), v_SGA.stride(1),
        o_THA.stride(0), o_THA.stride(1), table_BM.stride(0), block_size, scale * LOG2E,
        k_new, v_new, slots, k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        GROUP=group, A=head_dim, BLOCK_A=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=ATT_BLOCK_M,
        BLOCK_N=ATT_BLOCK_N, PRECISION=precision(q_THA), WRITE=new_kv is not None, num_warps=ATT_WARPS,
        num_stages=ATT_STAGES,
    )  # fmt: skip
    return o_THA


def attention(
    q_QHA: torch.Tensor, k_KGA: torch.Tensor, v_KGA: torch.Tensor, pos_Q: torch.Tensor, pad_to: int, scale: float
) -> torch.Tensor:
    """One sequence's causal attention, the CPU reference (kept under its old name for the attention backends)."""
    return attention_reference(q_QHA, k_KGA, v_KGA, pos_Q, pad_to, scale)


def packed_tables(cu_seqlens_B1: torch.Tensor, lengths: tuple[int, ...], num_heads: int, num_kv_heads: int):
    """What the trainer's attention needs of a packed batch, once for all layers: int32 cu_seqlens, key
    lengths, a key table with S = 1 (key j of sequence b is packed row cu[b] + j) and the tiles."""
    cu = cu_seqlens_B1.to(torch.int32)
    arange_M = torch.arange(max(lengths), device=cu.device, dtype=torch.int32)
    table_BM = (cu[:-1, None] + arange_M[None, :]).contiguous()
    return cu, (cu[1:] - cu[:-1]).contiguous(), table_BM, attention_tiles(cu, sum(lengths), num_heads // num_kv_heads)


def packed_attention(q_THA, k_TGA, v_TGA, cu_seqlens_B1: torch.Tensor, lengths: tuple[int, ...], reference,
                     tables=None):  # fmt: skip
    """Causal attention over packed sequences on CUDA (the trainer's side): the keys are the packed keys
    themselves. `reference(q, k, v)` gives the backward; `tables`: `packed_tables` of the batch."""
    cu, lens_B, table_BM, tiles = tables or packed_tables(cu_seqlens_B1, lengths, q_THA.shape[1], k_TGA.shape[1])
    scale = q_THA.shape[-1] ** -0.5

    def fast(q, k, v):
        return attention_triton(q, k, v, cu, lens_B, table_BM, 1, scale, tiles)

    return recompute(fast, reference, q_THA, k_TGA, v_TGA)


def paged_attention(q_THA, k_cache_NSGA, v_cache_NSGA, cu_q_B1, context_lens_B, block_tables_BM, scale: float,
                    tiles=None, new_kv=None):  # fmt: skip
    """Causal attention of a step's queries over a paged KV cache on CUDA (the engine's side); `tiles`:
    `attention_tiles` of the step, computed once for all layers; `new_kv`: a decode step's new keys and values,
    stored by the kernel (`attention_triton`)."""
    block_size = k_cache_NSGA.shape[1]
    k_SGA, v_SGA = k_cache_NSGA.flatten(0, 1), v_cache_NSGA.flatten(0, 1)
    return attention_triton(
        q_THA, k_SGA, v_SGA, cu_q_B1.to(torch.int32), context_lens_B.to(torch.int32),
        block_tables_BM.to(torch.int32), block_size, scale, tiles, new_kv,
    )  # fmt: skip
