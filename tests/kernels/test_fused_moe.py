"""The decode-sized MoE kernels (`leagues.kernels.fused_moe`) against their torch references (under Triton's
interpreter without a GPU), and the references against the model's own MoE layer."""

import os

import pytest
import torch

from leagues.kernels import fused_moe
from leagues.model.moe import GroupedExperts, Router

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    fused_moe.triton is None or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton: a GPU or the interpreter",
)


def _layer(num_experts=8, dim=48, ffn=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    router = Router(dim, num_experts, top_k=3, norm_topk_prob=True)
    experts = GroupedExperts(num_experts, dim, ffn)
    with torch.no_grad():
        for p in (router.weight, experts.w13, experts.w2):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        router.expert_bias.copy_(torch.randn(num_experts, generator=gen) * 0.01)
    return router, experts, torch.randn(2, dim, generator=gen)


def test_references_equal_the_models_moe_in_float32():
    router, experts, x_TD = _layer()
    with torch.no_grad():
        routing = router(x_TD)
        want = experts(x_TD, routing.weights_TK, routing.expert_ids_TK)
        weights, ids, logits = fused_moe.route_reference(x_TD, router.weight, router.expert_bias, 3, True)
        got = fused_moe.experts_reference(x_TD, weights, ids, experts.w13, experts.w2)
    assert torch.equal(ids, routing.expert_ids_TK) and torch.equal(logits, routing.logits_TE)
    torch.testing.assert_close(weights, routing.weights_TK)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("num_experts", [8, 6])  # 6: the expert axis is padded to a power of two
def test_triton_kernels_match_the_references(num_experts):
    router, experts, x_TD = _layer(num_experts=num_experts, seed=num_experts)
    args = [t.detach().to(DEVICE) for t in (x_TD, router.weight, router.expert_bias)]
    want = fused_moe.route_reference(*args, 3, True)
    got = fused_moe.route_triton(*args, 3, True, block_d=16)  # 16: the model dim spans three tiles
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
    given = fused_moe.route_triton(None, None, args[2], 3, True, logits_TE=got[2])  # the top-k of given logits
    assert torch.equal(given[0], got[0]) and torch.equal(given[1], got[1]) and given[2] is got[2]
    weights, ids = fused_moe.route_logits(got[2], args[2], 3, True)  # the operator the MoE layer calls
    assert torch.equal(ids, want[1])
    torch.testing.assert_close(weights, want[0], rtol=1e-5, atol=1e-6)
    # the weights rounded to bf16 in the kernel are the float32 ones rounded by torch (no cast launch after it);
    # the interpreter truncates where the GPU rounds to nearest: one bf16 step apart at most there
    bf16 = fused_moe.route_triton(None, None, args[2], 3, True, logits_TE=got[2], weights_dtype=torch.bfloat16)[0]
    rounded = given[0].to(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    if DEVICE == "cuda":
        assert torch.equal(bf16, rounded)
    else:
        torch.testing.assert_close(bf16.float(), rounded.float(), rtol=2**-7, atol=0)
    w13, w2 = experts.w13.detach().to(DEVICE), experts.w2.detach().to(DEVICE)
    want_out = fused_moe.experts_reference(args[0], want[0], want[1], w13, w2)
    got_out = fused_moe.experts_triton(args[0], want[0], want[1], w13, w2, block_f=8, block_d=16)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_m", [16, 64])
def test_align_torch_lays_every_pair_once_in_blocks_of_one_expert_in_pair_order(block_m):
    num_tokens, num_experts = 40, 6
    gen = torch.Generator().manual_seed(num_tokens)
    ids_TK = torch.stack([torch.randperm(num_experts, generator=gen)[:3] for _ in range(num_tokens)])
    sorted_S, block_expert_B = fused_moe.align_torch(ids_TK, num_experts, block_m)
    assert sorted_S.dtype == block_expert_B.dtype == torch.int32
    num_pairs = ids_TK.numel()
    slots, experts_B, flat = sorted_S.long().view(-1, block_m), block_expert_B.long(), ids_TK.flatten()
    taken = slots[slots < num_pairs]
    assert sorted(taken.tolist()) == list(range(num_pairs))  # every pair exactly once
    for block, rows in enumerate(slots):
        rows = rows[rows < num_pairs]
        if experts_B[block] == num_experts:
            assert len(rows) == 0  # past the last expert's blocks
        else:
            assert torch.all(flat[rows] == experts_B[block])
    for expert in range(num_experts):  # each expert's pairs in pair order (the stable layout)
        rows = slots[experts_B == expert].flatten()
        assert rows[rows < num_pairs].tolist() == torch.nonzero(flat == expert).flatten().tolist()
    counts = torch.bincount(flat, minlength=num_experts)
    used = int((experts_B < num_experts).sum())
    assert used == int(((counts + block_m - 1) // block_m).sum())  # no block more than each expert needs


@needs_kernels
@pytest.mark.parametrize(
    "num_tokens,num_experts,block_m", [(11, 8, 16), (40, 6, 16), (3, 64, 16), (100, 8, 16), (100, 8, 64), (40, 6, 64)]
)
def test_the_gate_up_launch_lays_the_pairs_out_as_align_torch_does(num_tokens, num_experts, block_m):
    # (100, 8): 300 pairs, more than one 256-pair chunk of the programs' scan
    _, experts, _ = _layer(num_experts=num_experts, seed=num_tokens)
    gen = torch.Generator().manual_seed(num_tokens)
    ids_TK = torch.stack([torch.randperm(num_experts, generator=gen)[:3] for _ in range(num_tokens)]).to(DEVICE)
    x_TD = torch.randn(num_tokens, 48, generator=gen).to(DEVICE)
    weights = torch.rand(num_tokens, 3, generator=gen).to(DEVICE)
    w13, w2 = experts.w13.detach().to(DEVICE), experts.w2.detach().to(DEVICE)
    tiles = dict(block_m=block_m, block_n=16, block_k=16)
    _, sorted_S, block_expert_B = fused_moe.tiled_launches(x_TD, weights, ids_TK, w13, w2, **tiles)
    want_S, want_B = fused_moe.align_torch(ids_TK, num_experts, block_m)
    assert torch.equal(block_expert_B, want_B)
    used = (want_B < num_experts).repeat_interleave(block_m)  # the slots of blocks past the end: unset
    assert torch.equal(sorted_S[used], want_S[used])


@needs_kernels
@pytest.mark.parametrize(
    "num_tokens,num_experts,max_pairs,block_m",
    [(11, 8, 4096, 16), (40, 6, 4096, 16), (100, 8, 4096, 16), (11, 8, 0, 16), (100, 8, 4096, 64), (40, 6, 0, 64)],
)
def test_tiled_kernels_match_the_reference(num_tokens, num_experts, max_pairs, block_m, monkeypatch):
    monkeypatch.setattr(fused_moe, "MAX_TILED_PAIRS", max_pairs)  # 0: the pairs aligned by a sort (training sizes)
    router, experts, _ = _layer(num_experts=num_experts, seed=num_tokens)
    x_TD = torch.randn(num_tokens, 48, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    weights, ids, _ = fused_moe.route_reference(x_TD, router.weight.to(DEVICE), router.expert_bias.to(DEVICE), 3, True)
    w13, w2 = experts.w13.detach().to(DEVICE), experts.w2.detach().to(DEVICE)
    want = fused_moe.pairs_reference(x_TD, weights, ids, w13, w2)
    got = fused_moe.pairs_tiled_triton(x_TD, weights, ids, w13, w2, block_m=block_m, block_n=16, block_k=16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_tiled_blocks_grow_with_the_pairs_an_expert_gets():
    min_pairs, block_m = fused_moe.WIDE_BLOCKS
    assert fused_moe.tiled_tiles(64 * 8, 64)["block_m"] == fused_moe.BLOCK_M  # 64 tokens of top 8 over 64 experts
    assert fused_moe.tiled_tiles(min_pairs * 64, 64)["block_m"] == block_m
    assert fused_moe.tiled_tiles(256 * 8, 64)["block_m"] == block_m
    assert fused_moe.INVARIANT_TILES["block_m"] == fused_moe.BLOCK_M  # deterministic mode keeps its blocks


def test_the_layer_picks_the_path_by_pairs_per_expert():
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert fused_moe.mode(x, 64, 8, 16) is None  # CPU: the grouped GEMMs
    if fused_moe.triton is not None and torch.cuda.is_available():
        with torch.no_grad():
            x = x.cuda()
            assert fused_moe.mode(x, 64, 8, 16) == "small"
            assert fused_moe.mode(x.repeat(32, 1), 64, 8, 16) == "tiled"  # 16 rows an expert
            assert fused_moe.mode(x.repeat(64, 1), 64, 8, 16) == "tiled"  # 32
            assert fused_moe.mode(x.repeat(64, 1), 64, 8, 2**17) is None  # 32 rows of big experts
            assert fused_moe.mode(x.repeat(256, 1), 64, 8, 16) is None


@needs_kernels
def test_a_replayed_route_gives_the_chosen_weights_bit_for_bit():
    router, _, _ = _layer(num_experts=8, seed=3)
    x_TD = torch.randn(5, 48, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    args = [x_TD, router.weight.detach().to(DEVICE), router.expert_bias.to(DEVICE)]
    weights, ids, logits = fused_moe.route_triton(*args, 3, True)
    again = fused_moe.route_triton(*args, 3, True, replay_ids_TK=ids)
    assert torch.equal(again[0], weights) and torch.equal(again[1], ids) and torch.equal(again[2], logits)
    flipped = fused_moe.route_triton(*args, 3, True, replay_ids_TK=ids.flip(1))  # the order of the given ids
    assert torch.equal(flipped[0], weights.flip(1))
    other_TK = (ids + 1) % 8  # experts it did not choose: their renormalised probabilities
    got = fused_moe.route_triton(*args, 3, True, replay_ids_TK=other_TK)[0]
    want = torch.softmax(logits.float(), dim=-1).gather(1, other_TK)
    torch.testing.assert_close(got, want / want.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


@needs_kernels
def test_the_top_k_sum_adds_in_index_order():
    y_TKD = torch.tensor([[[1e8], [1.0], [-1e8]], [[1.0], [1e8], [-1e8]], [[1e8], [-1e8], [1.0]]]).to(DEVICE)
    got = fused_moe.sum_pairs_triton(y_TKD, torch.float32)  # in float32 1e8 + 1 rounds to 1e8
    assert got.flatten().tolist() == [0.0, 0.0, 1.0]
    y_TKD = torch.randn(7, 5, 40, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    want = y_TKD[:, 0] + y_TKD[:, 1] + y_TKD[:, 2] + y_TKD[:, 3] + y_TKD[:, 4]
    assert torch.equal(fused_moe.sum_pairs_triton(y_TKD, torch.float32), want)
    if DEVICE == "cuda":  # the interpreter rounds to bfloat16 by truncation, the GPU to nearest even
        assert torch.equal(fused_moe.sum_pairs_triton(y_TKD, torch.bfloat16), want.bfloat16())


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="engine-sized batches: CUDA")
@pytest.mark.parametrize("num_tokens,block_m", [(64, 16), (256, 16), (512, 16), (256, 64), (512, 64)])
def test_the_tiled_launches_at_engine_sizes_lay_out_and_compute_as_the_references(num_tokens, block_m):
    """64 experts, top 8 (the anchor's router): the experts' lists (`expert_rows`) give align_torch's layout, and
    the pairs match the float32 reference."""
    gen = torch.Generator().manual_seed(num_tokens)
    ids_TK = torch.stack([torch.randperm(64, generator=gen)[:8] for _ in range(num_tokens)]).cuda()
    x_TD = (torch.randn(num_tokens, 128, generator=gen) * 0.5).cuda().to(torch.bfloat16)
    weights = torch.rand(num_tokens, 8, generator=gen).cuda()
    w13 = (torch.randn(64, 2 * 64, 128, generator=gen) * 0.1).cuda().to(torch.bfloat16)
    w2 = (torch.randn(64, 128, 64, generator=gen) * 0.1).cuda().to(torch.bfloat16)
    got, sorted_S, block_expert_B = fused_moe.tiled_launches(x_TD, weights, ids_TK, w13, w2, block_m=block_m)
    want_S, want_B = fused_moe.align_torch(ids_TK, 64, block_m)
    assert torch.equal(block_expert_B, want_B)
    used = (want_B < 64).repeat_interleave(block_m)
    assert torch.equal(sorted_S[used], want_S[used])
    want = fused_moe.pairs_reference(x_TD, weights, ids_TK, w13, w2)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
