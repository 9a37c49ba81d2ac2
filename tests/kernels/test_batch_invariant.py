"""Batch-invariant kernels. On the CPU the Triton kernels run under Triton's interpreter (conftest) against
the torch references; on a GPU they must be invariant
bit for bit, and the engine's bf16 logprobs must equal the trainer's."""

import os

import pytest
import torch

from leagues.kernels import batch_invariant as bi
from leagues.kernels import invariant_attention as ia
from leagues.kernels.grouped_gemm import grouped_mm_reference
from leagues.model.attention import PackedSeqs

triton = pytest.importorskip("triton")


def _paged_copy(k_TGA, v_TGA, lens, block_size, num_blocks, gen):
    """The packed keys scattered into a shuffled paged cache; returns (k_cache, v_cache, block_table)."""
    _, heads, dim = k_TGA.shape
    k_cache = torch.zeros(num_blocks, block_size, heads, dim, dtype=k_TGA.dtype, device=k_TGA.device)
    v_cache = torch.zeros_like(k_cache)
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(-(-n // block_size) for n in lens)
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    used, start = 0, 0
    for b, n in enumerate(lens):
        for j in range(n):
            block = int(perm[used + j // block_size])
            table[b, j // block_size] = block
            k_cache[block, j % block_size], v_cache[block, j % block_size] = k_TGA[start + j], v_TGA[start + j]
        used, start = used + -(-n // block_size), start + n
    return k_cache, v_cache, table.to(k_TGA.device)


def _rope_inputs(randn, num_tokens, num_heads, num_kv_heads, head_dim):
    """q and k as the heads of one fused q/k/v product (strided views), rotary tables of random angles, and
    per-head norm weights."""
    q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim
    q, k, _ = randn(num_tokens, q_dim + 2 * kv_dim).split([q_dim, kv_dim, kv_dim], dim=-1)
    angles = randn(num_tokens, head_dim // 2) * 3
    angles = torch.cat([angles, angles], dim=-1)
    q_THA, k_TGA = q.unflatten(-1, (num_heads, head_dim)), k.unflatten(-1, (num_kv_heads, head_dim))
    return q_THA, k_TGA, angles.cos(), angles.sin(), randn(head_dim), randn(head_dim)


def check_kernels_against_references(device: str = "cpu") -> dict[str, float]:
    """Largest |kernel - reference| of each Triton kernel on small odd shapes (float32)."""
    gen = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    errors = {}
    x, w = randn(37, 96), randn(50, 96)
    errors["matmul"] = (bi.matmul_nt_triton(x, w) - x @ w.T).abs().max().item()
    offs = torch.tensor([10, 10, 30, 37], dtype=torch.int32, device=device)
    w_e = randn(4, 50, 96)
    errors["grouped"] = (bi.grouped_mm_triton(x, w_e, offs) - grouped_mm_reference(x, w_e, offs)).abs().max().item()
    norm_w = randn(96)
    errors["rms_norm"] = (bi.rms_norm_triton(x, norm_w, 1e-6) - bi.rms_norm_reference(x, norm_w, 1e-6)).abs().max()
    q, k, cos, sin, norm_q, norm_k = _rope_inputs(randn, 6, 4, 2, 16)
    got, want = (
        bi.norm_rope_triton(q, k, cos, sin, norm_q, norm_k, 1e-6),
        bi.norm_rope_reference(q, k, cos, sin, norm_q, norm_k, 1e-6),
    )
    errors["norm_rope"] = max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))
    got, want = bi.add_rms_norm_triton(x, 2 * x, norm_w, 1e-6), bi.add_rms_norm_reference(x, 2 * x, norm_w, 1e-6)
    errors["add_rms_norm"] = max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))
    logits = randn(5, 9000) * 4
    errors["logsumexp"] = (bi.logsumexp_triton(logits) - torch.logsumexp(logits, -1)).abs().max().item()
    lens, heads, kv_heads, dim = [5, 70, 9], 4, 2, 16
    q, k, v = randn(sum(lens), heads, dim), randn(sum(lens), kv_heads, dim), randn(sum(lens), kv_heads, dim)
    packed = PackedSeqs.from_lengths(lens, device=device, impl="sdpa_loop")
    ref = packed.attend(0, q, k, v)
    errors["packed_attention"] = (
        (ia.packed_attention(q, k, v, packed.cu_seqlens_B1, packed.lengths, None) - ref).abs().max().item()
    )
    k_cache, v_cache, table = _paged_copy(k, v, lens, 4, 64, gen)
    ends = torch.tensor(lens).cumsum(0).tolist()
    for num_q in (1, 3):  # decode, and a 3-token chunk at the end of each sequence
        rows = torch.cat([torch.arange(e - num_q, e) for e in ends]).to(device)
        cu_q = torch.arange(0, len(lens) * num_q + 1, num_q, dtype=torch.int32, device=device)
        ctx = torch.tensor(lens, dtype=torch.int32, device=device)
        got = ia.paged_attention(q[rows], k_cache, v_cache, cu_q, ctx, table, dim**-0.5)
        errors[f"paged_attention_q{num_q}"] = (got - ref[rows]).abs().max().item()
    # a decode step whose kernel stores the new keys and values itself: the cache lacks them before
    last = torch.tensor(ends, device=device) - 1
    slots = torch.tensor([int(table[b, (n - 1) // 4]) * 4 + (n - 1) % 4 for b, n in enumerate(lens)], device=device)
    k_flat, v_flat = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    k_flat[slots], v_flat[slots] = 0.0, 0.0
    cu_q = torch.arange(len(lens) + 1, dtype=torch.int32, device=device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    got = ia.paged_attention(q[last], k_cache, v_cache, cu_q, ctx, table, dim**-0.5, new_kv=(k[last], v[last], slots))
    errors["paged_attention_write"] = (got - ref[last]).abs().max().item()
    errors["paged_attention_written"] = max((k_flat[slots] - k[last]).abs().max().item(),
                                            (v_flat[slots] - v[last]).abs().max().item())  # fmt: skip
    return {name: float(err) for name, err in errors.items()}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter runs where there is no GPU")
def test_triton_kernels_match_the_references_under_the_interpreter():
    errors = check_kernels_against_references("cpu")
    assert set(errors) >= {
        "matmul",
        "grouped",
        "rms_norm",
        "add_rms_norm",
        "norm_rope",
        "logsumexp",
        "paged_attention_write",
    }
    assert all(err < 1e-4 for err in errors.values()), errors


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter runs where there is no GPU")
def test_the_dense_product_sizes_its_tiles_by_shape(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(200, 192, generator=gen), torch.randn(150, 192, generator=gen)
    parts = (slice(0, 1), slice(3, 19), slice(100, 140))  # one row, 16 rows, 40 rows: each its own tile size
    assert len({bi.dense_tiles(p.stop - p.start, 150, 1) for p in parts} | {bi.dense_tiles(200, 150, 1)}) == 3
    # more rows: the pinned 128 x 128 tile where its grid (here 2 x 2 programs) fills the card, else smaller tiles
    assert bi.dense_tiles(200, 150, 4) != bi.dense_tiles(200, 150, 5) == bi.MM_SMALL_GRID
    # The interpreter's dot is numpy's: in float32 its summation order inside a K step follows the block's shape,
    # and it has no bfloat16, so the bits across tile shapes are the GPU test's to show
    # (`test_gpu_rows_do_not_depend_on_the_batch`); here every tile choice computes the product.
    full = bi.matmul_nt_triton(x, w)  # one SM here: the pinned tile
    assert torch.allclose(full, x @ w.T, atol=1e-4, rtol=0)
    for rows in parts:
        assert torch.allclose(bi.matmul_nt_triton(x[rows], w), full[rows], atol=1e-4, rtol=0)
    with monkeypatch.context() as patch:
        patch.setattr(bi, "num_sms", lambda device: 132)
        assert torch.allclose(bi.matmul_nt_triton(x, w), full, atol=1e-4, rtol=0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter runs where there is no GPU")
def test_the_fused_norm_and_rotary_compute_what_the_models_ops_compute_and_train_through_them():
    from leagues.model.layers import apply_rope

    gen = torch.Generator().manual_seed(3)
    q, k, cos, sin, norm_q, norm_k = _rope_inputs(lambda *s: torch.randn(*s, generator=gen), 7, 4, 2, 32)
    assert q.stride(0) != q.shape[1] * q.shape[2]  # the kernel reads the fused product's strided heads
    rotated_q, rotated_k = bi.norm_rope_triton(q, k, cos, sin)  # rotary alone: the same float32 ops, bit for bit
    assert torch.equal(rotated_q, apply_rope(q, cos, sin)) and torch.equal(rotated_k, apply_rope(k, cos, sin))
    normed = bi.norm_rope_triton(q, k, cos, sin, norm_q, norm_k, 1e-6)
    want = bi.norm_rope_reference(q, k, cos, sin, norm_q, norm_k, 1e-6)
    for got, ref in zip(normed, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, norm_q)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in (q, k, norm_q)]
    out = bi.recompute(bi.norm_rope_triton, bi.norm_rope_reference, *leaves[:2], cos, sin, leaves[2], norm_k, 1e-6)
    ref = bi.norm_rope_reference(*ref_leaves[:2], cos, sin, ref_leaves[2], norm_k, 1e-6)
    (out[0].sum() + 2 * out[1].sum()).backward()
    (ref[0].sum() + 2 * ref[1].sum()).backward()
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        assert torch.equal(leaf.grad, ref_leaf.grad)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter runs where there is no GPU")
def test_the_pairs_sum_the_add_and_the_norm_in_one_launch_equal_the_separate_launches():
    """The MoE's float32 pair outputs summed in the add-and-norm launch: the sum launch's numbers, then the add
    and the norm of two launches; and within rounding of the model's own ops (`transformer.add_pending`)."""
    from leagues.kernels import fused_moe
    from leagues.model.layers import RMSNorm
    from leagues.model.transformer import add_norm, add_pending

    gen = torch.Generator().manual_seed(5)
    x, pairs = torch.randn(7, 96, generator=gen), torch.randn(7, 8, 96, generator=gen)
    weight = torch.randn(96, generator=gen)
    total, normed = bi.add_rms_norm_triton(x, pairs, weight, 1e-6)
    want = bi.add_rms_norm_triton(x, fused_moe.sum_pairs_triton(pairs, x.dtype), weight, 1e-6)
    assert torch.equal(total, want[0]) and torch.equal(normed, want[1])
    op = bi.add_pairs_rms_norm(x, pairs, weight, 1e-6)  # the operator (the reference on the CPU)
    assert torch.equal(op[0], bi.add_rms_norm_reference(x, pairs, weight, 1e-6)[0])
    torch.testing.assert_close(op[0], total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(op[1], normed, rtol=1e-5, atol=1e-5)
    norm = RMSNorm(96, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(weight)
        model_sum = add_pending(x, pairs)
        torch.testing.assert_close(total, model_sum, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(normed, norm(model_sum), rtol=1e-5, atol=1e-5)
        assert torch.equal(add_norm(x, pairs, norm)[1], norm(model_sum))  # the CPU keeps the model's ops


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter runs where there is no GPU")
def test_the_fused_residual_add_and_norm_compute_the_models_sum_and_train_through_it():
    gen = torch.Generator().manual_seed(4)
    x, y, weight = torch.randn(9, 96, generator=gen), torch.randn(9, 96, generator=gen), torch.randn(96, generator=gen)
    total, normed = bi.add_rms_norm_triton(x, y, weight, 1e-6)
    assert torch.equal(total, x + y)
    torch.testing.assert_close(normed, bi.rms_norm_reference(x + y, weight, 1e-6), rtol=1e-5, atol=1e-5)
    leaves = [t.clone().requires_grad_() for t in (x, y, weight)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, y, weight)]
    out = bi.recompute(bi.add_rms_norm_triton, bi.add_rms_norm_reference, *leaves, 1e-6)
    ref = bi.add_rms_norm_reference(*ref_leaves, 1e-6)
    upstream = torch.randn(9, 96, generator=gen)
    (3 * out[0].sum() + (out[1] * upstream).sum()).backward()
    (3 * ref[0].sum() + (ref[1] * upstream).sum()).backward()
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        assert torch.equal(leaf.grad, ref_leaf.grad)


def test_sum_rows_adds_in_index_order():
    # in float32 1e8 + 1 rounds to 1e8: the order of the adds decides whether the 1 survives
    assert bi.sum_rows(torch.tensor([[[1.0], [1e8], [-1e8]]])).item() == 0.0
    assert bi.sum_rows(torch.tensor([[[1e8], [-1e8], [1.0]]])).item() == 1.0


# ---------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernels_match_the_references():
    assert all(err < 1e-3 for err in check_kernels_against_references("cuda").values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_rows_do_not_depend_on_the_batch():
    from leagues.model.layers import apply_rope

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 512, generator=gen).cuda().bfloat16()
    w = torch.randn(1000, 512, generator=gen).cuda().bfloat16()
    full = bi.matmul_nt(x, w)
    for rows in (slice(0, 1), slice(7, 8), slice(100, 164), slice(250, 300)):
        assert torch.equal(bi.matmul_nt(x[rows], w), full[rows])
    # 300 rows take the small-grid tile (3 x 8 pinned programs would idle the card); a training-sized batch the
    # pinned 128 x 128 one: the same bits
    sms = bi.num_sms(x.device)
    assert bi.dense_tiles(300, 1000, sms) == bi.MM_SMALL_GRID != bi.dense_tiles(4000, 1000, sms)
    big = torch.cat([x, torch.randn(3700, 512, generator=gen).cuda().bfloat16()])
    assert torch.equal(bi.matmul_nt(big, w)[:300], full)
    logits = torch.randn(40, 151936, generator=gen).cuda()
    assert torch.equal(bi.log_softmax(logits[3:4]), bi.log_softmax(logits)[3:4])
    norm_w = torch.randn(512, generator=gen).cuda().bfloat16()
    assert torch.equal(bi.rms_norm(x[5:6], norm_w, 1e-6), bi.rms_norm(x, norm_w, 1e-6)[5:6])
    q, k, cos, sin, norm_q, norm_k = _rope_inputs(lambda *s: torch.randn(*s, generator=gen).cuda().bfloat16(),
                                                  300, 16, 4, 128)  # fmt: skip
    full = bi.norm_rope(q, k, cos, sin, norm_q, norm_k, 1e-6)
    for rows in (slice(0, 1), slice(100, 164)):
        part = bi.norm_rope(q[rows], k[rows], cos[rows], sin[rows], norm_q, norm_k, 1e-6)
        assert torch.equal(part[0], full[0][rows]) and torch.equal(part[1], full[1][rows])
    y = torch.randn(300, 512, generator=gen).cuda().bfloat16()
    full = bi.add_rms_norm(x, y, norm_w, 1e-6)
    part = bi.add_rms_norm(x[5:6], y[5:6], norm_w, 1e-6)
    assert torch.equal(part[0], full[0][5:6]) and torch.equal(part[1], full[1][5:6])
    assert torch.equal(full[0], x + y)  # the residual add rounds as the unfused add does
    # bf16 rotary alone rounds as the model's unfused ops do (each product, then the sum)
    assert torch.equal(bi.norm_rope(q, k, cos, sin)[0], apply_rope(q, cos, sin))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_moe_rows_do_not_depend_on_the_batch_and_train_with_the_ordinary_backward():
    """Deterministic mode's MoE (route kernel, expert tiles at every size, index-order top-k sum) on a bf16
    anchor-sized layer: a token's output is the same alone, in a decode-sized batch and in a training-sized one
    (5,600 pairs, aligned by a sort), replayed, through expert parallelism's row path, and with gradients on;
    the backward is the ordinary layer's at the same routes."""
    from leagues.model.config import ModelConfig
    from leagues.model.moe import MoE, expert_order, expert_rows, sum_over_k

    cfg = ModelConfig(
        family="qwen3_moe", vocab_size=128, dim=1024, num_layers=1, num_heads=16, num_kv_heads=4, head_dim=64,
        num_experts=64, top_k=8, expert_ffn_dim=256, norm_topk_prob=True, moe_layers=(0,),
    )  # fmt: skip
    layer = MoE(cfg).cuda().bfloat16()
    gen = torch.Generator().manual_seed(0)
    params = (layer.router.weight, layer.experts.w13, layer.experts.w2)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.03)
    x_TD = torch.randn(700, 1024, generator=gen).cuda().bfloat16()
    layer.router.invariant, layer.experts.impl = True, "invariant"
    with torch.no_grad():
        full, routing = layer(x_TD)
        for rows in (slice(3, 4), slice(64, 128), slice(200, 456)):
            part, part_routing = layer(x_TD[rows])
            assert torch.equal(part, full[rows])
            assert torch.equal(part_routing.expert_ids_TK, routing.expert_ids_TK[rows])
            assert torch.equal(part_routing.weights_TK, routing.weights_TK[rows])
        assert torch.equal(layer(x_TD, routing.expert_ids_TK)[0], full)
        order_N, inverse_N, offs_E = expert_order(routing.expert_ids_TK.flatten(), 64)
        x_ND = x_TD[:, None].expand(-1, 8, -1).flatten(0, 1)[order_N]
        y_ND = expert_rows(x_ND, offs_E, layer.experts.w13, layer.experts.w2, "invariant")[inverse_N]
        y_TKD = y_ND.view(700, 8, -1) * routing.weights_TK[..., None]
        assert torch.equal(sum_over_k(y_TKD, "invariant").to(x_TD.dtype), full)

    def grads(replay=None):
        x = x_TD.clone().requires_grad_()
        for p in params:
            p.grad = None
        out, _ = layer(x, replay)
        out.float().square().sum().backward()
        return out.detach(), [x.grad, *(p.grad for p in params)]

    out, got = grads()
    assert torch.equal(out, full)
    layer.router.invariant, layer.experts.impl = False, "auto"
    _, want = grads(routing.expert_ids_TK)
    for g, w in zip(got, want, strict=True):
        assert (g.float() - w.float()).norm() / w.float().norm() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pairs_add_and_norm_equal_the_sum_launch_then_the_add_and_norm():
    from leagues.kernels import fused_moe

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(256, 1024, generator=gen).cuda().bfloat16()
    pairs = torch.randn(256, 8, 1024, generator=gen).cuda()
    weight = torch.randn(1024, generator=gen).cuda().bfloat16()
    got = bi.add_pairs_rms_norm(x, pairs, weight, 1e-6)
    want = bi.add_rms_norm_triton(x, fused_moe.sum_pairs_triton(pairs, x.dtype), weight, 1e-6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    compiled = torch.compile(lambda *a: bi.add_pairs_rms_norm(*a, 1e-6), fullgraph=True)
    again = compiled(x, pairs, weight)
    assert torch.equal(again[0], got[0]) and torch.equal(again[1], got[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_deterministic_moe_pairs_summed_in_the_add_and_norm_equal_the_summed_experts():
    """Deterministic mode's engine hands the MoE's pair outputs to the next add-and-norm launch; the trainer
    (with gradients) sums them first. Both must give the same bits."""
    from leagues.kernels import fused_moe

    gen = torch.Generator().manual_seed(7)
    for num_tokens in (1, 64, 300):
        x = torch.randn(num_tokens, 256, generator=gen).cuda().bfloat16()
        ids = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(num_tokens)]).cuda()
        weights = torch.rand(num_tokens, 4, generator=gen).cuda().bfloat16()
        w13 = (torch.randn(16, 128, 256, generator=gen) * 0.1).cuda().bfloat16()
        w2 = (torch.randn(16, 256, 64, generator=gen) * 0.1).cuda().bfloat16()
        norm_w = torch.randn(256, generator=gen).cuda().bfloat16()
        with torch.no_grad():
            summed = bi.moe_experts(x, weights, ids, w13, w2, fused_moe.experts_reference)
            want = bi.add_rms_norm(x, summed, norm_w, 1e-6)
            got = bi.add_rms_norm(x, bi.moe_pairs(x, weights, ids, w13, w2), norm_w, 1e-6)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_moe_pairs_keep_their_bits_under_any_tiles_of_the_same_k_step():
    """The tiled expert launches may size their programs (columns, warps, stages) by the batch as the dense
    product does: a pair's numbers follow the K step alone. A decode token's pairs under each tile choice equal
    the same token's inside a training-sized batch under the pinned tiles."""
    from leagues.kernels import fused_moe

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(300, 1024, generator=gen).cuda().bfloat16()
    ids = torch.stack([torch.randperm(64, generator=gen)[:8] for _ in range(300)]).cuda()
    weights = torch.rand(300, 8, generator=gen).cuda().bfloat16()
    w13 = (torch.randn(64, 512, 1024, generator=gen) * 0.03).cuda().bfloat16()
    w2 = (torch.randn(64, 1024, 256, generator=gen) * 0.06).cuda().bfloat16()
    pinned = fused_moe.INVARIANT_TILES
    full = fused_moe.pairs_tiled_triton(x, weights, ids, w13, w2, **pinned)
    choices = [
        pinned | dict(block_n=n, warps=(w, w), stages=(s, s)) for n, w, s in ((32, 2, 4), (128, 4, 2), (16, 1, 3))
    ]
    for tiles in [*choices, *(fused_moe.invariant_tiles(rows * 8) for rows in (1, 8, 64, 256))]:
        assert tiles["block_k"] == pinned["block_k"]
        assert torch.equal(fused_moe.pairs_tiled_triton(x, weights, ids, w13, w2, **tiles), full)
        for rows in (slice(0, 1), slice(5, 13)):
            part = fused_moe.pairs_tiled_triton(x[rows], weights[rows], ids[rows], w13, w2, **tiles)
            assert torch.equal(part, full[rows])
