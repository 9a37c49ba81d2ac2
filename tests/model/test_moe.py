"""MoE layer: grouped-GEMM kernel parity, routing capture and replay, router logits, and a gradient check."""

import pytest
import torch

from leagues.kernels.grouped_gemm import can_use_fast, grouped_mm, grouped_mm_fast, grouped_mm_reference
from leagues.model import ForwardBatch, Transformer, config_from_hf, load_pretrained, moe
from leagues.model.transformer import padded_size

from .hf_cases import write_hf_checkpoint

# Qwen3-MoE shaped, every dim a multiple of 4 so float32 rows are 16-byte aligned for torch._grouped_mm on CPU.
QWEN3_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "mlp_only_layers": [1],
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}
LENGTHS = [5, 11, 1, 7]


def make_model(seed: int = 0, std: float = 0.2, **overrides) -> Transformer:
    model = Transformer(config_from_hf(QWEN3_MOE | overrides))
    model.init_weights(seed=seed, std=std)  # a larger std than 0.02 so routing is far from uniform
    return model


def make_batch(vocab: int = 64, seed: int = 1, **kwargs) -> ForwardBatch:
    ids = torch.randint(0, vocab, (sum(LENGTHS),), generator=torch.Generator().manual_seed(seed))
    return ForwardBatch.packed(ids, LENGTHS, **kwargs)


def routers(model: Transformer) -> list[torch.nn.Parameter]:
    return [block.moe.router.weight for block in model.layers if block.is_moe]


# ---------------------------------------------------------------- grouped GEMM kernel


@pytest.mark.parametrize("counts", [[3, 0, 5, 8], [0, 0, 4, 0], [7, 1, 0, 0], [0, 0, 0, 0]])
def test_grouped_mm_fast_matches_reference(counts):
    # On CPU, torch._grouped_mm runs forward for float32 when rows are 16-byte aligned (dims multiples of 4),
    # but its backward fails on this CPU build, so only the forward is compared here.
    gen = torch.Generator().manual_seed(0)
    x_NI = torch.randn(sum(counts), 12, generator=gen)
    w_EOI = torch.randn(len(counts), 20, 12, generator=gen)
    offs_E = torch.tensor(counts).cumsum(0).to(torch.int32)
    ref = grouped_mm_reference(x_NI, w_EOI, offs_E)
    assert ref.shape == (sum(counts), 20)
    torch.testing.assert_close(grouped_mm_fast(x_NI, w_EOI, offs_E), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grouped_mm(x_NI, w_EOI, offs_E, impl="grouped"), ref, rtol=1e-6, atol=1e-6)


def test_grouped_mm_reference_is_per_row_matmul():
    counts = [2, 0, 3, 1]
    gen = torch.Generator().manual_seed(1)
    x_NI = torch.randn(6, 4, generator=gen)
    w_EOI = torch.randn(4, 5, 4, generator=gen)
    expert_of_row = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    expected = torch.stack([w_EOI[e] @ x_NI[n] for n, e in enumerate(expert_of_row.tolist())])
    got = grouped_mm_reference(x_NI, w_EOI, torch.tensor(counts).cumsum(0).to(torch.int32))
    torch.testing.assert_close(got, expected)


def test_auto_dispatch_uses_reference_on_cpu():
    x, w = torch.randn(4, 8), torch.randn(2, 8, 8)
    assert not can_use_fast(x, w)
    assert not can_use_fast(x.bfloat16(), w.bfloat16())  # bf16 but not CUDA


@pytest.mark.parametrize("lengths", [LENGTHS, [2, 1]])
def test_grouped_impl_matches_reference_impl_on_model(lengths):
    model = make_model()
    ids = torch.randint(0, 64, (sum(lengths),), generator=torch.Generator().manual_seed(1))
    batch = ForwardBatch.packed(ids, lengths, capture_experts=True)
    with torch.no_grad():
        model.set_moe_impl("reference")
        ref = model.run(batch)
        model.set_moe_impl("grouped")
        got = model.run(batch)
    if len(lengths) == 2:  # 3 tokens x top-2 over 8 experts: some experts get no token (empty groups)
        assert (torch.bincount(ref.routed_experts_TLK[:, 0].flatten().long(), minlength=8) == 0).any()
    assert torch.equal(got.routed_experts_TLK, ref.routed_experts_TLK)
    torch.testing.assert_close(got.logits_TV, ref.logits_TV, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="moe impl"):
        model.set_moe_impl("fast")


# ---------------------------------------------------------------- routing capture and replay


def test_capture_returns_router_choice():
    model = make_model()
    with torch.no_grad():
        out = model.run(make_batch(capture_experts=True, capture_router_logits=True))
    routes = out.routed_experts_TLK
    assert routes.shape == (sum(LENGTHS), 2, 2)  # [T, MoE layers (0 and 2; 1 is dense), top_k]
    assert routes.dtype == torch.uint8
    assert len(out.router_logits) == 2
    for l, logits_TE in enumerate(out.router_logits):
        assert logits_TE.shape == (sum(LENGTHS), 8)
        assert torch.equal(routes[:, l].long(), logits_TE.topk(2, dim=-1).indices)
    # Nothing captured unless asked.
    with torch.no_grad():
        plain = model.run(make_batch())
    assert plain.routed_experts_TLK is None and plain.router_logits == []
    assert torch.equal(plain.logits_TV, out.logits_TV)


def test_replay_own_routes_is_exact_and_other_routes_differ():
    model = make_model()
    with torch.no_grad():
        out = model.run(make_batch(capture_experts=True))
        routes = out.routed_experts_TLK
        replayed = model.run(make_batch(replay_experts_TLK=routes, capture_experts=True))
        rolled = (routes.long() + 1) % 8
        other = model.run(make_batch(replay_experts_TLK=rolled.to(torch.uint8), capture_experts=True))
    assert torch.equal(replayed.logits_TV, out.logits_TV)
    assert torch.equal(replayed.routed_experts_TLK, routes)
    assert torch.equal(other.routed_experts_TLK.long(), rolled)
    assert (other.logits_TV - out.logits_TV).abs().max() > 1e-3
    # Replay is per layer: other ids in the last MoE layer change the logits but no router input before it.
    mixed = routes.clone()
    mixed[:, 1] = rolled[:, 1].to(torch.uint8)
    with torch.no_grad():
        ref = model.run(make_batch(capture_router_logits=True))
        half = model.run(make_batch(replay_experts_TLK=mixed, capture_router_logits=True))
    assert not torch.allclose(half.logits_TV, out.logits_TV)
    for ours, theirs in zip(half.router_logits, ref.router_logits, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("replay", [False, True])
def test_padded_run_gives_the_unpadded_results(replay):
    """A model that pads packed batches (as compiled for static sizes) returns the batch's own tokens' hidden
    states, logits, routes and router logits, and the same gradients: the padding is invisible."""
    model = make_model()
    with torch.no_grad():
        routes = model.run(make_batch(capture_experts=True)).routed_experts_TLK if replay else None
    outs, grads = [], []
    for pad_to in (1, 16):
        model.pad_to = pad_to
        batch = make_batch(capture_experts=True, capture_router_logits=True, replay_experts_TLK=routes)
        out = model.run(batch)
        loss = torch.nn.functional.cross_entropy(out.logits_TV, batch.input_ids_T.roll(-1))
        loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad()
    plain, padded = outs
    wide = make_batch().padded(30)  # longer than any real sequence: cut into pieces no longer than the longest
    assert wide.attention.lengths == (*LENGTHS, 11, 11, 8) and wide.attention.max_seqlen_bound == 16
    assert sum(LENGTHS) % 16 and padded.hidden_TD.shape == plain.hidden_TD.shape == (sum(LENGTHS), 32)
    torch.testing.assert_close(padded.logits_TV, plain.logits_TV, rtol=0, atol=1e-5)
    assert torch.equal(padded.routed_experts_TLK, plain.routed_experts_TLK)
    for ours, theirs in zip(padded.router_logits, plain.router_logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-5, msg=name)


def test_padded_sizes_grow_geometrically():
    """Size buckets: unit x (1, 2, 3, 4, 6, 8, 12, 16, ...), the least that holds the batch; from one unit to 2^k
    units at most 2k + 1 sizes, each less than half padding."""
    assert [padded_size(n, 4) for n in (1, 4, 5, 8, 9, 12, 13, 16, 17, 24, 25, 33)] == [
        4, 4, 8, 8, 12, 12, 16, 16, 24, 24, 32, 48,
    ]  # fmt: skip
    sizes = {padded_size(n, 1024) for n in range(1, 16385)}
    assert sorted(sizes) == [k * 1024 for k in (1, 2, 3, 4, 6, 8, 12, 16)]
    assert all(padded_size(n, 1024) < 2 * n for n in range(1025, 16385, 7))


def loss_of(model: Transformer, batch: ForwardBatch) -> torch.Tensor:
    logits = model.run(batch).logits_TV
    targets = batch.input_ids_T.roll(-1)
    return torch.nn.functional.cross_entropy(logits, targets)


def test_replay_keeps_router_gradients():
    model = make_model()
    with torch.no_grad():
        routes = model.run(make_batch(capture_experts=True)).routed_experts_TLK

    loss_of(model, make_batch()).backward()
    own = [w.grad.clone() for w in routers(model)]
    model.zero_grad()
    loss_of(model, make_batch(replay_experts_TLK=routes)).backward()
    replayed = [w.grad.clone() for w in routers(model)]
    model.zero_grad()
    loss_of(model, make_batch(replay_experts_TLK=((routes.long() + 3) % 8).to(torch.uint8))).backward()
    other = [w.grad.clone() for w in routers(model)]

    for g_own, g_rep, g_other in zip(own, replayed, other, strict=True):
        assert g_rep.abs().sum() > 0
        assert g_other.abs().sum() > 0
        torch.testing.assert_close(g_rep, g_own, rtol=1e-6, atol=1e-9)
        assert not torch.allclose(g_other, g_own)


@pytest.mark.parametrize(
    ("make_bad", "match"),
    [
        (lambda r: r[:-1], r"shape \(23, 2, 2\), expected \(24, 2, 2\)"),
        (lambda r: r[:, :1], r"shape \(24, 1, 2\), expected \(24, 2, 2\)"),
        (lambda r: torch.cat([r, r[..., :1]], dim=-1), r"shape \(24, 2, 3\), expected \(24, 2, 2\)"),
        (lambda r: r.flatten(), r"shape \(96,\)"),
        (lambda r: torch.where(r == r.max(), 8, r), "outside 0..7"),
        (lambda r: torch.where(r == r.min(), -1, r.long()), "outside 0..7"),
    ],
)
def test_bad_replay_raises(make_bad, match):
    model = make_model()
    with torch.no_grad():
        routes = model.run(make_batch(capture_experts=True)).routed_experts_TLK
        with pytest.raises(ValueError, match=match):
            model.run(make_batch(replay_experts_TLK=make_bad(routes)))


# ---------------------------------------------------------------- MoE layer placement and router logits


@pytest.mark.parametrize(("case", "moe_layers"), [("qwen3_moe_mixed", (0, 2)), ("qwen3_moe_sparse_step", (1,))])
def test_moe_layer_placement_and_router_logits(case, moe_layers, tmp_path):
    hf_model = write_hf_checkpoint(case, tmp_path)
    model = load_pretrained(tmp_path)
    cfg = model.config
    hf_sparse = tuple(i for i, layer in enumerate(hf_model.model.layers) if hasattr(layer.mlp, "gate"))
    assert cfg.moe_layers == moe_layers == hf_sparse
    assert [block.is_moe for block in model.layers] == [i in moe_layers for i in range(cfg.num_layers)]

    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.run(ForwardBatch.packed(ids.flatten(), [9, 9], capture_experts=True, capture_router_logits=True))
        hf_router_logits = hf_model(ids, output_router_logits=True).router_logits
    assert len(out.router_logits) == len(moe_layers) == len(hf_router_logits)
    for ours, theirs in zip(out.router_logits, hf_router_logits, strict=True):
        assert ours.shape == (18, cfg.num_experts)
        torch.testing.assert_close(ours, theirs.reshape(18, -1), rtol=1e-5, atol=1e-5)
    assert out.routed_experts_TLK.shape == (18, len(moe_layers), cfg.top_k)


# ---------------------------------------------------------------- finite-difference gradient check


def test_gradients_match_finite_differences_float64():
    """Analytic gradients against central differences, in float64, with routing replayed so the loss is smooth.

    RMSNorm statistics and the router softmax run in float32 even for a float64 model (as in HF), so the loss
    carries float32 rounding noise: a fairly large step (1e-2) and a 2% tolerance keep the check above it.
    """
    model = make_model(seed=3, num_hidden_layers=2, mlp_only_layers=[]).double()
    with torch.no_grad():
        routes = model.run(make_batch(capture_experts=True)).routed_experts_TLK
    probe = torch.randn(sum(LENGTHS), 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def loss() -> torch.Tensor:
        return (model.run(make_batch(replay_experts_TLK=routes)).logits_TV * probe).sum()

    loss().backward()
    params = dict(model.named_parameters())
    checks = [
        ("layers.0.moe.router.weight", (3, 5)),
        ("layers.1.moe.experts.w13", (routes[0, 1, 0].item(), 2, 7)),  # an expert that token 0 uses
        ("layers.0.moe.experts.w2", (routes[4, 0, 1].item(), 9, 3)),
        ("layers.0.attn.wq.weight", (6, 11)),
    ]
    eps = 1e-2
    for name, idx in checks:
        param = params[name]
        analytic = param.grad[idx].item()
        with torch.no_grad():
            orig = param[idx].item()
            param[idx] = orig + eps
            up = loss().item()
            param[idx] = orig - eps
            down = loss().item()
            param[idx] = orig
        numeric = (up - down) / (2 * eps)
        assert abs(analytic) > 1e-2, name
        assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 1e-3, (name, numeric, analytic)


def test_packed_attention_grouped_by_length_equals_per_sequence_reference():
    """The CPU fast path (one SDPA per distinct length) against the per-sequence loop, values and grads."""
    from leagues.model.attention import PackedSeqs

    gen = torch.Generator().manual_seed(0)
    lengths = [3, 5, 3, 7, 5, 1, 3]
    total = sum(lengths)
    q = torch.randn(total, 4, 8, generator=gen, requires_grad=True)
    k = torch.randn(total, 2, 8, generator=gen, requires_grad=True)
    v = torch.randn(total, 2, 8, generator=gen, requires_grad=True)
    fast = PackedSeqs.from_lengths(lengths).attend(0, q, k, v)
    ref = PackedSeqs.from_lengths(lengths, impl="sdpa_loop").attend(0, q, k, v)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)
    grads = torch.autograd.grad(fast.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("num_rows", "num_experts"), [(0, 8), (1, 8), (37, 5), (512, 64), (2048, 64), (3000, 64)])
def test_expert_order_is_the_stable_sort_by_expert(num_rows, num_experts):
    """Counted pairwise (decode-sized batches on CUDA) or sorted, the order is a stable sort's, bit for bit."""
    ids_N = torch.randint(0, num_experts, (num_rows,), generator=torch.Generator().manual_seed(num_rows))
    sorted_ids_N, want_order_N = torch.sort(ids_N, stable=True)
    for pairwise in (True, False):
        order_N, inverse_N, offs_E = moe.expert_order(ids_N, num_experts, pairwise)
        assert torch.equal(order_N, want_order_N)
        assert torch.equal(order_N[inverse_N], torch.arange(num_rows))
        want_offs_E = torch.searchsorted(sorted_ids_N, torch.arange(1, num_experts + 1)).to(torch.int32)
        assert torch.equal(offs_E, want_offs_E)


def test_a_blocks_residual_add_waits_for_the_next_block_only_without_autograd():
    """Without autograd a block hands its output over unadded (the next block adds it, with its first norm); with
    autograd it adds it itself (one tensor crosses a checkpointed boundary). Both give the same logits, bit for bit."""
    model, batch = make_model(), make_batch()
    x_TD = model.embed(batch.input_ids_T)
    rope = model.rope(batch.positions_T, x_TD.dtype)
    block = model.layers[0]
    with torch.no_grad():
        x_no_grad, pending, _ = block(x_TD, rope, batch.attention)
        want = model.run(batch).logits_TV
    assert pending is not None and pending.shape == x_TD.shape
    x_grad, none, _ = block(x_TD, rope, batch.attention)
    assert none is None and torch.equal(x_grad.detach(), x_no_grad + pending)
    assert torch.equal(model.run(batch).logits_TV.detach(), want)
