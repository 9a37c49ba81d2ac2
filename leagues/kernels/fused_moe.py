"""The MoE layer of a decode-sized batch in a handful of kernels: route, gate/up with SiLU, down.

Where it sits: `leagues.model.moe.MoE` takes this path on CUDA when no gradient is needed and the batch is
decode-sized (the engine's decode steps, up to `MAX_TILED_PAIRS` (token, expert) pairs); prefill, training
and large batches keep the grouped GEMMs (`leagues.kernels.grouped_gemm`).

Decisions:
- No sort, no permutation: each (token, expert) pair reads its expert's weights directly. With at most
  about one pair per expert (`applies`: pairs <= experts) no weight is read twice as often as the grouped
  GEMM would read it, and the layer is three launches instead of a dozen (the step is launch-bound there).
- Route: one program a token computes the router's logits (rounded to the activations' dtype, as
  `F.linear`'s output is), the float32 softmax, the top-k of probability + expert bias (ties to the lowest
  id) and the renormalised weights of the chosen experts. One program reading the router's weight waits on
  memory at a few tokens, so there the caller computes the logits with a GEMV launch spread over the GPU
  (`leagues.kernels.gemv`) and `route_logits` runs the same kernel from them.
- Gate/up: program (pair, block of F) accumulates both projections in float32 and stores silu(g) * u once.
- Down: program (token, block of D) walks the token's k experts and adds weight * (h @ w2[e].T) in float32,
  so the routing weight and the top-k sum live in the kernel's epilogue; one rounding at the end.
- Tiled (more pairs than experts, up to `MAX_TILED_PAIRS`): the pairs are laid out by expert in blocks of
  `block_m` rows (each block one expert's, padded with an out-of-range pair, a block's rows in pair order; 16
  rows, 64 from `WIDE_BLOCKS` pairs an expert up), and gate/up and down are tensor-core GEMM tiles of a block x
  a slice of the output, reading each expert's weights once per block instead of once per pair. One small
  launch lists each expert's pairs in pair order (`expert_rows`: a program an expert, all scanning the ids at
  once); each gate/up program finds its block's expert from the counts and reads its rows from that list, and
  the first column's programs store the layout for down. (Measured on an H100 at 256 tokens, a layer: every
  gate/up program scanning every pair itself cost that launch about 17 us; one align program serialised on
  atomic counters cost 19 us.) Down stores each pair's weighted float32 row; the top-k sum is the caller's (it
  fuses with the residual add in a compiled block).
- Deterministic mode (`leagues.kernels.batch_invariant`) runs every batch through these kernels, so a token's
  numbers never depend on what shares its batch: the route kernel (also replaying given experts), the tiled
  GEMMs (beyond `MAX_TILED_PAIRS` the layout comes from `align_torch`, a stable sort) and `sum_pairs_triton`
  (the top-k sum in index order, one rounding).
- The Triton entry points are `torch.library` operators, opaque to `torch.compile` (the compiled
  blocks call them inside the decode CUDA graphs). The torch references beside them define the numbers.

Legend: T tokens, D model dim, E experts, K top-k, F expert ffn dim, P = T*K pairs.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the references need none
    triton = None


MAX_TILED_PAIRS = 4096
"""Up to this many (token, expert) pairs the tiled kernels lay the pairs out themselves (`expert_rows`, E programs
each scanning every pair); beyond, `align_torch` sorts them."""
BLOCK_M = 16
"""Rows of one expert block in the tiled kernels by default (the smallest tensor-core tile); `block_m` of the
tiles overrides it."""
SMALL_TILES = dict(block_f=4, block_d=4, inner_d=1024, inner_f=512, warps=(2, 2))
"""The small path's launches: rows of F (gate/up) and of D (down) a program owns, the reduction tile of each,
and (gate/up, down) warps a program. Measured best at 1-8 tokens for 1024 x 256 and 2048 x 768 experts on an
H200 (`benchmarks/moe_small_tune.py`): at decode sizes these launches wait on memory latency, so many small
programs, each with a whole row of its reduction in flight, beat fewer larger ones."""
TILED_TILES = dict(block_m=BLOCK_M, block_n=64, block_k=64, warps=(4, 4), stages=(3, 3))
"""The tiled path's launches: rows of an expert block, output columns and reduction step a program takes, and
(gate/up, down) warps and pipeline stages. Deterministic mode takes `invariant_tiles` instead (a row's reduction
order follows `block_k`, which it pins)."""
WIDE_BLOCKS = (12, 64)
"""(pairs an expert on average, rows of a block): from that many pairs an expert up, default mode's tiled launches
take blocks of that many rows (`tiled_tiles`). Every block reads its expert's whole weight slice from L2, so at
256 tokens of the anchor (32 pairs an expert) 16-row blocks read each expert's weights ~2.5 times (~160 MB of
L2 reads a layer for 64 MB of weights); one 64-row block an expert reads them once."""
INVARIANT_TILES = dict(block_m=BLOCK_M, block_n=64, block_k=64, warps=(4, 4), stages=(3, 3))
"""The tiled launches of deterministic mode (`leagues.kernels.batch_invariant`) beyond `INVARIANT_FEW_PAIRS`: fixed,
whatever tuning `TILED_TILES` gets; its `block_k` (and 16-row blocks) hold at every size, so the trainer and the
engine of any version agree."""
INVARIANT_FEW_PAIRS = (
    (8, dict(block_n=32, warps=(1, 2), stages=(3, 3))),
    (64, dict(block_n=64, warps=(4, 1), stages=(4, 2))),
)
"""(at most this many pairs, the columns, warps and stages that replace `INVARIANT_TILES`') of deterministic mode's
decode-sized launches, smallest first: a pair's numbers follow the K step alone (a GPU test checks the bits under
other tiles), so only `block_k` is pinned. Measured on an H100 at the anchor's experts (`benchmarks/moe_small_tune.py
--block-k 64`): one token's gate/up and down 10.7 and 4.7 against 12.3 and 5.9 us; 8 tokens' 16.7 and 7.4 against
17.8 and 8.6."""
ROUTE_TILES = dict(block_d=128, num_warps=16)
"""The route launch: the model-dim tile of its GEMV and warps a program (measured best at 1-8 tokens, both shapes)."""


def mode(x_TD: torch.Tensor, num_experts: int, top_k: int, ffn_dim: int) -> str | None:
    """Which fused path serves this batch: "small" (at most one pair per expert), "tiled" (a few blocks of
    rows per expert, at most `MAX_TILED_PAIRS` pairs), or None (the grouped GEMMs). Only CUDA, 16-bit, without
    gradients. Measured on an H200 (benchmarks/moe_layer.py): the tiles beat the grouped GEMMs up to 32 rows
    an expert for 1024 x 256 experts but lose at 32 for 2048 x 768 ones, whose weight reads the grouped GEMM
    streams better; hence 16 rows an expert above 2**19 weights a projection."""
    pairs = x_TD.shape[0] * top_k
    if triton is None or not x_TD.is_cuda or x_TD.dtype not in (torch.bfloat16, torch.float16):
        return None
    rows_per_expert = 32 if x_TD.shape[1] * ffn_dim <= 2**19 else 16
    if torch.is_grad_enabled() or pairs == 0 or pairs > min(MAX_TILED_PAIRS, rows_per_expert * num_experts):
        return None
    return "small" if pairs <= num_experts else "tiled"


# ---------------------------------------------------------------------------------------------- references


def route_reference(x_TD, w_ED, bias_E, top_k: int, renormalize: bool):
    """(weights_TK float32, ids_TK int64, logits_TE in x's dtype): the router of `leagues.model.moe`."""
    logits_TE = torch.nn.functional.linear(x_TD, w_ED)
    return (*route_logits_reference(logits_TE, bias_E, top_k, renormalize), logits_TE)


def route_logits_reference(logits_TE, bias_E, top_k: int, renormalize: bool):
    """(weights_TK float32, ids_TK int64) of given router logits."""
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    ids_TK = torch.topk(probs_TE + bias_E, top_k, dim=-1).indices
    weights_TK = probs_TE.gather(1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    return weights_TK, ids_TK


def pairs_reference(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF):
    """weights[t, k] * w2[e] @ (silu(gate) * up)(w13[e] @ x[t]) per pair [T, K, D], float32."""
    num_ffn = w2_EDF.shape[-1]
    h_TKF = torch.einsum("tkfd,td->tkf", w13_EFD[ids_TK].float(), x_TD.float())
    h_TKF = torch.nn.functional.silu(h_TKF[..., :num_ffn]) * h_TKF[..., num_ffn:]
    h_TKF = h_TKF.to(x_TD.dtype).float()  # the kernels store h in x's dtype
    y_TKD = torch.einsum("tkdf,tkf->tkd", w2_EDF[ids_TK].float(), h_TKF)
    return y_TKD * weights_TK.float()[..., None]


def experts_reference(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF):
    """sum_k of `pairs_reference`, float32 inside, x's dtype out."""
    return pairs_reference(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF).sum(1).to(x_TD.dtype)


# ---------------------------------------------------------------------------------------------- triton kernels

if triton is not None:

    @triton.jit
    def _route_kernel(
        x_ptr, w_ptr, bias_ptr, logits_ptr, ids_ptr, weights_ptr, D, stride_x, stride_w,
        E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
        RENORM: tl.constexpr, REPLAY: tl.constexpr, LOGITS_GIVEN: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0).to(tl.int64)
        offs_e = tl.arange(0, E_PAD)
        mask_e = offs_e < E
        if LOGITS_GIVEN:  # computed by another launch (`route_logits`): x and w are not read
            logits = tl.load(logits_ptr + t * E + offs_e, mask=mask_e, other=0.0)
        else:
            # products summed per lane across the D tiles, then one reduction over the lanes: no cross-warp
            # reduction (and its barriers) inside the loop, so the tiles' loads stream back to back
            acc = tl.zeros([E_PAD, BLOCK_D], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                x = tl.load(x_ptr + t * stride_x + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                w_mask = mask_e[:, None] & mask_d[None, :]
                w = tl.load(w_ptr + offs_e[:, None] * stride_w + offs_d[None, :], mask=w_mask, other=0.0)
                acc += w.to(tl.float32) * x[None, :]
            logits = tl.sum(acc, axis=1).to(logits_ptr.dtype.element_ty)
            tl.store(logits_ptr + t * E + offs_e, logits, mask=mask_e)
        scores = tl.where(mask_e, logits.to(tl.float32), float("-inf"))
        probs = tl.exp(scores - tl.max(scores, axis=0))
        probs = probs / tl.sum(probs, axis=0)
        if REPLAY:  # the experts are given (ids_ptr holds them): expert e's rank is its place among them
            offs_k = tl.arange(0, K_PAD)
            given = tl.load(ids_ptr + t * K + offs_k, mask=offs_k < K, other=-1)
            match = given[None, :] == offs_e[:, None]
            chosen = mask_e & (tl.sum(match.to(tl.int32), axis=1) > 0)
            rank = tl.sum(tl.where(match, offs_k[None, :], 0), axis=1)
        else:
            ranked = tl.where(mask_e, probs + tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0), float("-inf"))
            # top-k as ranks, in one pass: expert e's rank counts the experts ahead of it (higher, or equal with
            # a lower id), instead of k rounds of max-then-argmin reductions
            other, mine = ranked[None, :], ranked[:, None]
            ahead = (other > mine) | ((other == mine) & (offs_e[None, :] < offs_e[:, None]))
            rank = tl.sum(ahead.to(tl.int32), axis=1)
            chosen = mask_e & (rank < K)
            tl.store(ids_ptr + t * K + rank, offs_e.to(tl.int64), mask=chosen)
        weights = tl.where(chosen, probs, 0.0)
        if RENORM:  # the same lanes summed whether chosen here or given: replay reproduces the weights bitwise
            weights = weights / tl.sum(weights, axis=0)
        tl.store(weights_ptr + t * K + rank, weights.to(weights_ptr.dtype.element_ty), mask=chosen)

    @triton.jit
    def _gate_up_kernel(
        x_ptr, ids_ptr, w13_ptr, h_ptr, D, F, stride_x, stride_we, stride_wf, stride_h,
        K: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pair = tl.program_id(0).to(tl.int64)
        offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        w_base = w13_ptr + tl.load(ids_ptr + pair) * stride_we
        x_row = x_ptr + (pair // K) * stride_x
        gate = tl.zeros([BLOCK_F], dtype=tl.float32)
        up = tl.zeros([BLOCK_F], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            x = tl.load(x_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            w_mask = mask_f[:, None] & mask_d[None, :]
            w_gate = tl.load(w_base + offs_f[:, None] * stride_wf + offs_d[None, :], mask=w_mask, other=0.0)
            w_up = tl.load(w_base + (F + offs_f)[:, None] * stride_wf + offs_d[None, :], mask=w_mask, other=0.0)
            gate += tl.sum(w_gate.to(tl.float32) * x[None, :], axis=1)
            up += tl.sum(w_up.to(tl.float32) * x[None, :], axis=1)
        h = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(h_ptr + pair * stride_h + offs_f, h.to(h_ptr.dtype.element_ty), mask=mask_f)

    @triton.jit
    def _down_kernel(
        h_ptr, ids_ptr, weights_ptr, w2_ptr, out_ptr, D, F, stride_h, stride_we, stride_wd, stride_o,
        K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        out = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            pair = t * K + k
            w_base = w2_ptr + tl.load(ids_ptr + pair) * stride_we
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for f0 in range(0, F, BLOCK_F):
                offs_f = f0 + tl.arange(0, BLOCK_F)
                mask_f = offs_f < F
                h = tl.load(h_ptr + pair * stride_h + offs_f, mask=mask_f, other=0.0).to(tl.float32)
                w_mask = mask_d[:, None] & mask_f[None, :]
                w = tl.load(w_base + offs_d[:, None] * stride_wd + offs_f[None, :], mask=w_mask, other=0.0)
                acc += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
            out += tl.load(weights_ptr + pair).to(tl.float32) * acc
        tl.store(out_ptr + t * stride_o + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)

    @triton.jit
    def _expert_rows_kernel(ids_ptr, table_ptr, counts_ptr, P, CHUNK: tl.constexpr):
        """Program e: expert e's pairs in pair order, at table[e * P + 0 ..], and their count (the stable layout
        `align_torch` sorts out, listed by expert: E programs of one scan each, in parallel)."""
        e = tl.program_id(0)
        seen = tl.zeros([1], dtype=tl.int32)
        for p0 in range(0, P, CHUNK):
            offs_p = p0 + tl.arange(0, CHUNK)
            mine = tl.load(ids_ptr + offs_p, mask=offs_p < P, other=-1) == e
            rank = seen + tl.cumsum(mine.to(tl.int32), axis=0) - 1
            tl.store(table_ptr + e.to(tl.int64) * P + rank, offs_p.to(tl.int32), mask=mine)
            seen += tl.sum(mine.to(tl.int32), axis=0)
        tl.store(counts_ptr + e + tl.arange(0, 1), seen)

    @triton.jit
    def _block_expert(counts_ptr, block, E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
        """(expert of tile block `block`, E past the last expert's blocks; the block's first rank among that
        expert's pairs). Experts take ceil(count / BLOCK_M) blocks each, in expert order."""
        offs_e = tl.arange(0, E_PAD)
        counts = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        ends = tl.cumsum(padded, axis=0)
        first = block * BLOCK_M
        expert = tl.minimum(tl.sum((ends <= first).to(tl.int32), axis=0), E)
        start = tl.sum(tl.where(offs_e == expert, ends - padded, 0), axis=0)
        return expert, first - start

    @triton.jit
    def _gate_up_tiled_kernel(
        x_ptr, table_ptr, counts_ptr, sorted_ptr, block_expert_ptr, w13_ptr, h_ptr, P, D, F, stride_x, stride_we,
        stride_wf, stride_h, E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LAYOUT_GIVEN: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        block = tl.program_id(0)
        if LAYOUT_GIVEN:
            expert = tl.load(block_expert_ptr + block).to(tl.int64)
        else:  # each program finds its block in the experts' lists; the first column's programs store the layout
            expert, rank0 = _block_expert(counts_ptr, block, E, E_PAD, BLOCK_M)
            if tl.program_id(1) == 0:
                tl.store(block_expert_ptr + block, expert.to(tl.int32))
        if expert < E:
            if LAYOUT_GIVEN:
                rows = tl.load(sorted_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            else:
                ranks = rank0 + tl.arange(0, BLOCK_M)
                count = tl.load(counts_ptr + expert)
                rows = tl.load(table_ptr + expert.to(tl.int64) * P + ranks, mask=ranks < count, other=P)
                if tl.program_id(1) == 0:
                    tl.store(sorted_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M), rows)
                rows = rows.to(tl.int64)
            valid = rows < P
            tokens = rows // K
            offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < F
            w_base = w13_ptr + expert * stride_we
            gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < D
                a = tl.load(x_ptr + tokens[:, None] * stride_x + offs_k[None, :], mask=valid[:, None] & mask_k[None, :],
                            other=0.0)  # fmt: skip
                w_mask = mask_k[:, None] & mask_n[None, :]
                w_gate = tl.load(w_base + offs_n[None, :] * stride_wf + offs_k[:, None], mask=w_mask, other=0.0)
                w_up = tl.load(w_base + (F + offs_n)[None, :] * stride_wf + offs_k[:, None], mask=w_mask, other=0.0)
                gate = tl.dot(a, w_gate, gate, input_precision=PRECISION)
                up = tl.dot(a, w_up, up, input_precision=PRECISION)
            h = gate / (1.0 + tl.exp(-gate)) * up
            out_mask = valid[:, None] & mask_n[None, :]
            tl.store(h_ptr + rows[:, None] * stride_h + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _down_tiled_kernel(
        h_ptr, sorted_ptr, block_expert_ptr, weights_ptr, w2_ptr, y_ptr, P, D, F, stride_h, stride_we, stride_wd,
        stride_y, E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        block = tl.program_id(0)
        expert = tl.load(block_expert_ptr + block).to(tl.int64)
        if expert < E:
            rows = tl.load(sorted_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            valid = rows < P
            offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < D
            w_base = w2_ptr + expert * stride_we
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, F, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < F
                a = tl.load(h_ptr + rows[:, None] * stride_h + offs_k[None, :], mask=valid[:, None] & mask_k[None, :],
                            other=0.0)  # fmt: skip
                w = tl.load(w_base + offs_n[None, :] * stride_wd + offs_k[:, None],
                            mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # fmt: skip
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
            acc = acc * tl.load(weights_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptr + rows[:, None] * stride_y + offs_n[None, :], acc, mask=valid[:, None] & mask_n[None, :])

    @triton.jit
    def _sum_pairs_kernel(y_ptr, out_ptr, D, stride_y, stride_o, K: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[t] = y[t, 0] + y[t, 1] + ... in index order, float32, one rounding to out's dtype."""
        t = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.load(y_ptr + t * K * stride_y + offs_d, mask=mask_d, other=0.0)
        for k in tl.static_range(1, K):
            acc += tl.load(y_ptr + (t * K + k) * stride_y + offs_d, mask=mask_d, other=0.0)
        tl.store(out_ptr + t * stride_o + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


def route_triton(
    x_TD, w_ED, bias_E, top_k: int, renormalize: bool, replay_ids_TK=None, logits_TE=None,
    weights_dtype: torch.dtype = torch.float32, **tiles,
):  # fmt: skip
    """`route_reference` in one launch (CUDA, or the CPU under TRITON_INTERPRET=1); `tiles` overrides
    `ROUTE_TILES`. Each token is its own program with the same tiles whatever the batch, so a token's route
    does not depend on what shares its batch. `replay_ids_TK`: the experts are given; their weights are
    computed as when the kernel chose them (bit for bit when they are the ones it would choose). `logits_TE`:
    the router's logits are given (x and w are then not read; pass None), returned as they are. The weights are
    rounded once to `weights_dtype` (the float32 ones `.to(weights_dtype)` would give, without a launch)."""
    tiles = ROUTE_TILES | tiles
    given = logits_TE is not None
    if given:
        logits_TE = logits_TE.contiguous()
        (num_tokens, num_experts), dim = logits_TE.shape, 1
        x_TD = w_ED = logits_TE
    else:
        (num_tokens, dim), num_experts = x_TD.shape, w_ED.shape[0]
        x_TD, w_ED = x_TD.contiguous(), w_ED.contiguous()
        logits_TE = x_TD.new_empty(num_tokens, num_experts)
    if replay_ids_TK is None:
        ids_TK = torch.empty(num_tokens, top_k, dtype=torch.int64, device=x_TD.device)
    else:
        ids_TK = replay_ids_TK.to(device=x_TD.device, dtype=torch.int64).contiguous()
    weights_TK = torch.empty(num_tokens, top_k, dtype=weights_dtype, device=x_TD.device)
    if num_tokens:
        _route_kernel[(num_tokens,)](
            x_TD, w_ED, bias_E.float().contiguous(), logits_TE, ids_TK, weights_TK, dim, x_TD.stride(0),
            w_ED.stride(0), E=num_experts, E_PAD=triton.next_power_of_2(num_experts), K=top_k,
            K_PAD=triton.next_power_of_2(top_k), BLOCK_D=min(tiles["block_d"], triton.next_power_of_2(dim)),
            RENORM=renormalize, REPLAY=replay_ids_TK is not None, LOGITS_GIVEN=given,
            num_warps=2 if given else tiles["num_warps"],  # given: the top-k of E values alone
        )  # fmt: skip
    return weights_TK, ids_TK, logits_TE


def sum_pairs_triton(y_TKD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each token's K float32 rows added in index order (one launch), cast to `dtype`: the same per token
    whatever the batch."""
    num_tokens, top_k, dim = y_TKD.shape
    y_TKD = y_TKD.contiguous()
    out_TD = torch.empty(num_tokens, dim, dtype=dtype, device=y_TKD.device)
    if num_tokens:
        block_d = min(1024, triton.next_power_of_2(dim))
        _sum_pairs_kernel[(num_tokens, triton.cdiv(dim, block_d))](
            y_TKD, out_TD, dim, y_TKD.stride(1), out_TD.stride(0), K=top_k, BLOCK_D=block_d, num_warps=4
        )
    return out_TD


def experts_triton(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF, **tiles):
    """`experts_reference` in two launches; `tiles` overrides `SMALL_TILES`."""
    num_tokens, dim = x_TD.shape
    top_k, num_ffn = ids_TK.shape[1], w2_EDF.shape[-1]
    x_TD, ids_TK, weights_TK = x_TD.contiguous(), ids_TK.contiguous(), weights_TK.contiguous()
    w13_EFD, w2_EDF = w13_EFD.contiguous(), w2_EDF.contiguous()
    h_PF = x_TD.new_empty(num_tokens * top_k, num_ffn)
    out_TD = x_TD.new_empty(num_tokens, dim)
    if num_tokens == 0:
        return out_TD
    tiles = SMALL_TILES | tiles
    block_f, block_d, inner_d, inner_f, warps = (
        tiles[k] for k in ("block_f", "block_d", "inner_d", "inner_f", "warps")
    )
    _gate_up_kernel[(num_tokens * top_k, triton.cdiv(num_ffn, block_f))](
        x_TD, ids_TK, w13_EFD, h_PF, dim, num_ffn, x_TD.stride(0), w13_EFD.stride(0), w13_EFD.stride(1),
        h_PF.stride(0), K=top_k, BLOCK_F=block_f, BLOCK_D=min(inner_d, triton.next_power_of_2(dim)),
        num_warps=warps[0],
    )  # fmt: skip
    _down_kernel[(num_tokens, triton.cdiv(dim, block_d))](
        h_PF, ids_TK, weights_TK, w2_EDF, out_TD, dim, num_ffn, h_PF.stride(0), w2_EDF.stride(0),
        w2_EDF.stride(1), out_TD.stride(0), K=top_k, BLOCK_D=block_d,
        BLOCK_F=min(inner_f, triton.next_power_of_2(num_ffn)), num_warps=warps[1],
    )  # fmt: skip
    return out_TD


def tiled_tiles(num_pairs: int, num_experts: int) -> dict:
    """Default mode's tiled launches at `num_pairs` (token, expert) pairs over `num_experts` (`WIDE_BLOCKS`)."""
    min_pairs, block_m = WIDE_BLOCKS
    return TILED_TILES | dict(block_m=block_m) if num_pairs >= min_pairs * num_experts else TILED_TILES


def invariant_tiles(num_pairs: int) -> dict:
    """Deterministic mode's tiled launches at `num_pairs` (token, expert) pairs (`INVARIANT_FEW_PAIRS`)."""
    for max_pairs, tiles in INVARIANT_FEW_PAIRS:
        if num_pairs <= max_pairs:
            return INVARIANT_TILES | tiles
    return INVARIANT_TILES


def align_torch(ids_TK: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """(sorted_S int32, block_expert_B int32): the tiled launches' layout (`tiled_launches`) by a stable sort,
    for more pairs than one launch's programs scan (`MAX_TILED_PAIRS`: training-sized batches of deterministic
    mode). Empty slots hold the pair count P; blocks past the last expert's hold `num_experts`."""
    ids_P = ids_TK.flatten().long()
    num_pairs = ids_P.numel()
    num_blocks = -(-num_pairs // block_m) + num_experts
    device = ids_P.device
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(0, ids_P, torch.ones_like(ids_P))
    padded_E = (counts_E + block_m - 1) // block_m * block_m
    ends_E = padded_E.cumsum(0)
    sorted_ids_P, order_P = torch.sort(ids_P, stable=True)
    rank_P = torch.arange(num_pairs, device=device) - (counts_E.cumsum(0) - counts_E)[sorted_ids_P]
    sorted_S = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_S[(ends_E - padded_E)[sorted_ids_P] + rank_P] = order_P.to(torch.int32)
    starts_B = torch.arange(num_blocks, device=device) * block_m
    block_expert_B = torch.searchsorted(ends_E, starts_B, right=True).clamp(max=num_experts).to(torch.int32)
    return sorted_S, block_expert_B


def pairs_tiled_triton(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF, **tiles):
    """`pairs_reference` as two tiled GEMM launches (the caller sums over k: inside a compiled block that sum
    fuses with the residual add). `tiles` overrides `TILED_TILES`."""
    return tiled_launches(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF, **tiles)[0]


def expert_rows(ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table_EP int32, counts_E int32): each expert's pairs in pair order (row e, its first counts[e] entries;
    the rest unset), one launch of a program an expert."""
    num_pairs = ids_TK.numel()
    table_EP = torch.empty(num_experts, num_pairs, dtype=torch.int32, device=ids_TK.device)
    counts_E = torch.empty(num_experts, dtype=torch.int32, device=ids_TK.device)
    _expert_rows_kernel[(num_experts,)](
        ids_TK, table_EP, counts_E, num_pairs, CHUNK=min(1024, triton.next_power_of_2(num_pairs))
    )
    return table_EP, counts_E


def tiled_launches(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF, **tiles):
    """(pairs [T, K, D] float32, sorted_S int32, block_expert_B int32): `pairs_tiled_triton` and the layout its
    launches used: the pairs by expert in blocks of `block_m` slots, B = cdiv(P, block_m) + E blocks, fixed
    by P and E alone (no host sync). Up to `MAX_TILED_PAIRS` pairs the gate/up launch finds each block's rows
    in the experts' lists (`expert_rows`) and stores the layout for the down launch (slots of a block past the
    last expert's, marked E in block_expert_B, stay unwritten); beyond, `align_torch` sorts it out first. Both
    are the stable layout, so the order of a block's rows is fixed too."""
    tiles = TILED_TILES | tiles
    block_m, block_n, block_k = tiles["block_m"], tiles["block_n"], tiles["block_k"]
    warps, stages = tiles["warps"], tiles["stages"]
    num_tokens, dim = x_TD.shape
    top_k, num_ffn, num_experts = ids_TK.shape[1], w2_EDF.shape[-1], w2_EDF.shape[0]
    x_TD, weights_TK, ids_TK = x_TD.contiguous(), weights_TK.contiguous(), ids_TK.contiguous()
    w13_EFD, w2_EDF = w13_EFD.contiguous(), w2_EDF.contiguous()
    num_pairs = num_tokens * top_k
    h_PF = x_TD.new_empty(num_pairs, num_ffn)
    y_PD = torch.empty(num_pairs, dim, dtype=torch.float32, device=x_TD.device)
    num_blocks = triton.cdiv(num_pairs, block_m) + num_experts
    given = num_pairs > MAX_TILED_PAIRS
    if given:
        sorted_S, block_expert_B = align_torch(ids_TK, num_experts, block_m)
    else:
        sorted_S = torch.empty(num_blocks * block_m, dtype=torch.int32, device=x_TD.device)
        block_expert_B = torch.empty(num_blocks, dtype=torch.int32, device=x_TD.device)
    if num_tokens == 0:
        return y_PD.view(0, top_k, dim), sorted_S, block_expert_B
    # a given layout needs no experts' lists: the kernel never reads the two pointers passed in their place
    table_EP, counts_E = (sorted_S, block_expert_B) if given else expert_rows(ids_TK, num_experts)
    precision = "ieee" if x_TD.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    _gate_up_tiled_kernel[(num_blocks, triton.cdiv(num_ffn, block_n))](
        x_TD, table_EP, counts_E, sorted_S, block_expert_B, w13_EFD, h_PF, num_pairs, dim, num_ffn, x_TD.stride(0),
        w13_EFD.stride(0), w13_EFD.stride(1), h_PF.stride(0), E=num_experts,
        E_PAD=triton.next_power_of_2(num_experts), K=top_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        LAYOUT_GIVEN=given, PRECISION=precision, num_warps=warps[0], num_stages=stages[0],
    )  # fmt: skip
    _down_tiled_kernel[(num_blocks, triton.cdiv(dim, block_n))](
        h_PF, sorted_S, block_expert_B, weights_TK, w2_EDF, y_PD, num_pairs, dim, num_ffn, h_PF.stride(0),
        w2_EDF.stride(0), w2_EDF.stride(1), y_PD.stride(0), E=num_experts, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, PRECISION=precision, num_warps=warps[1], num_stages=stages[1],
    )  # fmt: skip
    return y_PD.view(num_tokens, top_k, dim), sorted_S, block_expert_B


# ---------------------------------------------------------------------------------------------- operators


@torch.library.custom_op("leagues::moe_route", mutates_args=())
def route(
    x_TD: torch.Tensor, w_ED: torch.Tensor, bias_E: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights_TK in x's dtype, ids_TK int64, logits_TE): the Triton kernel on CUDA, the reference elsewhere
    (the float32 weights rounded once: what the layer uses)."""
    if x_TD.is_cuda and triton is not None:
        return route_triton(x_TD, w_ED, bias_E, top_k, renormalize, weights_dtype=x_TD.dtype)
    weights_TK, ids_TK, logits_TE = route_reference(x_TD, w_ED, bias_E, top_k, renormalize)
    return weights_TK.to(x_TD.dtype), ids_TK, logits_TE


@route.register_fake
def _(x_TD, w_ED, bias_E, top_k, renormalize):
    num_tokens, num_experts = x_TD.shape[0], w_ED.shape[0]
    weights_TK = x_TD.new_empty(num_tokens, top_k)
    return weights_TK, x_TD.new_empty(num_tokens, top_k, dtype=torch.int64), x_TD.new_empty(num_tokens, num_experts)


@torch.library.custom_op("leagues::moe_route_logits", mutates_args=())
def route_logits(
    logits_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK in the logits' dtype, ids_TK int64) of router logits computed beforehand (a few tokens: by a
    GEMV launch spread over the GPU, where `route`'s one program a token waits on memory): the route kernel's
    top-k."""
    if logits_TE.is_cuda and triton is not None:
        given = route_triton(None, None, bias_E, top_k, renormalize, logits_TE=logits_TE, weights_dtype=logits_TE.dtype)
        return given[:2]
    weights_TK, ids_TK = route_logits_reference(logits_TE, bias_E, top_k, renormalize)
    return weights_TK.to(logits_TE.dtype), ids_TK


@route_logits.register_fake
def _(logits_TE, bias_E, top_k, renormalize):
    num_tokens = logits_TE.shape[0]
    weights_TK = logits_TE.new_empty(num_tokens, top_k)
    return weights_TK, logits_TE.new_empty(num_tokens, top_k, dtype=torch.int64)


@torch.library.custom_op("leagues::moe_experts_small", mutates_args=())
def experts(
    x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor, w13_EFD: torch.Tensor, w2_EDF: torch.Tensor
) -> torch.Tensor:
    """The experts' output [T, D] of a decode-sized batch: the Triton kernels on CUDA, the reference elsewhere."""
    if x_TD.is_cuda and triton is not None:
        return experts_triton(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF)
    return experts_reference(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF)


@experts.register_fake
def _(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF):
    return torch.empty_like(x_TD)


@torch.library.custom_op("leagues::moe_pairs_tiled", mutates_args=())
def pairs_tiled(
    x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor, w13_EFD: torch.Tensor, w2_EDF: torch.Tensor
) -> torch.Tensor:
    """Each pair's weighted expert output [T, K, D] float32 for up to `MAX_TILED_PAIRS` pairs: the tiled Triton
    kernels on CUDA (`tiled_tiles`), the reference elsewhere."""
    if x_TD.is_cuda and triton is not None:
        tiles = tiled_tiles(ids_TK.numel(), w2_EDF.shape[0])
        return pairs_tiled_triton(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF, **tiles)
    return pairs_reference(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF)


@pairs_tiled.register_fake
def _(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF):
    return x_TD.new_empty(*ids_TK.shape, x_TD.shape[1], dtype=torch.float32)
