"""The engine's GPU paths (compiled decode replayed in CUDA graphs, the fused sampler in the graph, persistent
input buffers, sleep and wake): outputs against a full forward and against the same engine without graphs.
Run on a GPU machine with `pytest -m gpu`; skipped elsewhere."""

import pytest
import torch

from leagues.engine import SamplingParams
from leagues.kernels import sampling
from leagues.model import load_pretrained

from .reference import engine_of, make_prompts, reference_logprobs, reference_routes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
VOCAB = 101


def _sampled(engine, prompts, temperature=1.0):
    params = SamplingParams(
        temperature=temperature, max_new_tokens=24, ignore_eos=True, seed=7, n=2, return_routed_experts=True
    )
    return engine.generate(prompts, params)


def test_graph_decode_matches_a_full_forward_and_survives_sleep(tiny_path):
    model = load_pretrained(tiny_path, dtype=torch.float32)  # the reference runs on the CPU
    prompts = make_prompts([3, 9, 17, 30, 5], VOCAB, seed=2)
    with engine_of(tiny_path, dtype="float32", num_blocks=256, compile_model="true") as engine:
        assert engine.runner.compiled and engine.runner.graphs
        before = _sampled(engine, prompts)
        engine.sleep()
        engine.wake()
        after = _sampled(engine, prompts)
    assert [o.token_ids for o in after] == [o.token_ids for o in before]
    for out in before:
        want = reference_logprobs(model, out, 1.0)
        torch.testing.assert_close(torch.tensor(out.logprobs), want, rtol=0, atol=1e-4)
        assert torch.equal(out.routed_experts, reference_routes(model, out).to(out.routed_experts.dtype))


def test_graphs_give_the_eager_engines_tokens_for_seeded_sampling(tiny_path):
    prompts = make_prompts([4, 11, 23], VOCAB, seed=3)
    runs = {}
    for graphs, compiled in ((True, "true"), (False, "true"), (False, "false")):
        with engine_of(tiny_path, dtype="float32", num_blocks=256, cuda_graphs=graphs, compile_model=compiled) as e:
            runs[graphs, compiled] = _sampled(e, prompts)
    want = [o.token_ids for o in runs[False, "false"]]
    for outs in runs.values():
        assert [o.token_ids for o in outs] == want


def test_bf16_graph_decode_stays_close_to_a_full_forward(tiny_path):
    model = load_pretrained(tiny_path, dtype=torch.float32)  # the float32 reference on the CPU
    prompts = make_prompts([6, 13, 29], VOCAB, seed=4)
    with engine_of(tiny_path, dtype="bfloat16", num_blocks=256) as engine:
        assert engine.runner.compiled
        outs = _sampled(engine, prompts)
    for out in outs:
        want = reference_logprobs(model, out, 1.0)
        assert (torch.tensor(out.logprobs) - want).abs().max() < 0.1


def test_bf16_graph_decode_of_64_rows_stays_close_to_a_full_forward(tiny_path):
    """64 rows of the tiny model's 8 experts, top 2: 16 pairs an expert, so the decode graphs' tiled MoE runs
    `fused_moe.WIDE_BLOCKS`' taller expert blocks."""
    from leagues.kernels import fused_moe

    assert fused_moe.tiled_tiles(64 * 2, 8)["block_m"] == fused_moe.WIDE_BLOCKS[1] > fused_moe.BLOCK_M
    model = load_pretrained(tiny_path, dtype=torch.float32)
    prompts = make_prompts([5 + i % 23 for i in range(32)], VOCAB, seed=5)
    with engine_of(tiny_path, dtype="bfloat16", num_blocks=512) as engine:
        outs = _sampled(engine, prompts)
    assert len(outs) == 64
    for out in outs[::7]:
        want = reference_logprobs(model, out, 1.0)
        assert (torch.tensor(out.logprobs) - want).abs().max() < 0.1


def test_fused_sampler_matches_the_reference_at_full_vocabulary():
    gen = torch.Generator().manual_seed(0)
    logits_BV = (torch.randn(256, 151936, generator=gen) * 4).cuda().bfloat16()
    temperature_B = torch.tensor([0.0, 1.0, 0.6, 1.0] * 64).cuda()
    seed_B = torch.randint(-(2**62), 2**62, (256,), generator=gen).cuda()
    step_B = torch.randint(0, 4096, (256,), generator=gen).cuda()
    want = sampling.sample_plain_reference(logits_BV, temperature_B, seed_B, step_B)
    got = sampling.sample_plain_triton(logits_BV, temperature_B, seed_B, step_B)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "num_tokens,mode", [(1, "small"), (8, "small"), (16, "tiled"), (128, "tiled"), (256, "tiled"), (300, None)]
)
def test_fused_moe_layer_matches_the_grouped_path_in_bf16(num_tokens, mode):
    """The decode-sized paths (route, (align,) gate/up, down kernels; at up to `gemv.MAX_ROWS` tokens the router's
    logits by the GEMV kernel, at 16 by the route kernel and the tiles) against the grouped GEMMs on the same bf16
    layer."""
    from leagues.model.config import ModelConfig
    from leagues.model.moe import MoE

    cfg = ModelConfig(
        family="qwen3_moe", vocab_size=128, dim=1024, num_layers=1, num_heads=16, num_kv_heads=4, head_dim=64,
        num_experts=64, top_k=8, expert_ffn_dim=256, norm_topk_prob=True, moe_layers=(0,),
    )  # fmt: skip
    layer = MoE(cfg).cuda().bfloat16()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (layer.router.weight, layer.experts.w13, layer.experts.w2):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.03)
    x_TD = torch.randn(num_tokens, 1024, generator=gen).cuda().bfloat16()
    with torch.inference_mode():
        assert layer._fused(x_TD) == mode
        fused_out, fused_routing = layer(x_TD)
        layer.experts.impl = "grouped"
        want_out, want_routing = layer(x_TD)
    assert (fused_routing.expert_ids_TK == want_routing.expert_ids_TK).float().mean() > 0.95
    same = (fused_routing.expert_ids_TK == want_routing.expert_ids_TK).all(dim=1)
    scale = want_out.float().abs().max()
    assert ((fused_out - want_out).float()[same].abs().max() / scale) < 2e-2


def test_mapped_memory_keeps_its_addresses_for_a_captured_graph():
    from leagues.engine.memory import MappedMemory, supported

    device = torch.device("cuda")
    assert supported(device)
    memory = MappedMemory(3 * 2**20 + 5, device)
    assert memory.num_bytes % 2**20 == 0 and memory.num_bytes >= 3 * 2**20 + 5
    x = memory.view(torch.float32, (1024, 64))
    assert x.data_ptr() == memory.address and x.device.type == "cuda"
    x.fill_(1.0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.add_(2.0)
    graph.replay()
    assert torch.all(x == 3.0)
    free_before = torch.cuda.mem_get_info()[0]
    memory.release()
    assert not memory.mapped and torch.cuda.mem_get_info()[0] >= free_before + 2**20
    memory.remap()
    x.zero_()
    graph.replay()  # the graph's pointer is the same address, now backed by new pages
    torch.cuda.synchronize()
    assert torch.all(x == 2.0)
    memory.close()


def test_sleep_and_wake_keep_the_graphs_and_free_the_cache(tiny_path):
    prompts = make_prompts([3, 9, 17], VOCAB, seed=5)
    with engine_of(tiny_path, dtype="bfloat16", num_blocks=4096, compile_model="true") as engine:
        graphs = dict(engine.runner.graphs)
        before = _sampled(engine, prompts)
        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        assert torch.cuda.mem_get_info()[0] >= free_awake + engine.runner.cache_bytes * 0.9
        engine.wake()
        assert engine.runner.graphs == graphs  # the same captured graphs: nothing re-captured
        after = _sampled(engine, prompts)
        engine.sleep(offload_weights=True)  # weights move: graphs are captured again at wake
        engine.wake()
        again = _sampled(engine, prompts)
    assert [o.token_ids for o in after] == [o.token_ids for o in before] == [o.token_ids for o in again]


def test_overlapped_graph_steps_give_the_waiting_engines_outputs(tiny_path):
    """Graph steps launched before the previous step lands (input tokens taken on the device from its samples)
    against the same engine waiting for every step; stop tokens end sequences while a step is in flight."""
    prompts = make_prompts([3, 9, 17, 30, 5, 12], VOCAB, seed=6)
    params = [
        SamplingParams(temperature=1.0, max_new_tokens=n, seed=i, n=2, stop_token_ids=list(range(10, 25)),
                       return_routed_experts=True)
        for i, n in enumerate([12, 40, 7, 30, 1, 25])
    ]  # fmt: skip
    runs = {}
    for overlap in (False, True):
        with engine_of(tiny_path, dtype="float32", num_blocks=256, overlap_scheduling=str(overlap).lower()) as e:
            assert e.runner.graphs
            runs[overlap] = e.generate(prompts, params), e.stats["overlapped_steps"]
    (waiting, none), (overlapped, count) = runs[False], runs[True]
    assert none == 0 and count > 10
    assert [(o.token_ids, o.finish_reason) for o in overlapped] == [(o.token_ids, o.finish_reason) for o in waiting]
    for got, want in zip(overlapped, waiting, strict=True):
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), rtol=0, atol=1e-4)
        assert torch.equal(got.routed_experts, want.routed_experts)


def test_split_k_graphs_serve_long_contexts_and_match_a_full_forward(tiny_path):
    """Few sequences with long contexts replay the split-K graphs (the one-pass grid would leave SMs idle):
    logprobs equal a float32 full forward, tokens equal an engine without graphs."""
    model = load_pretrained(tiny_path, dtype=torch.float32)
    prompts = make_prompts([700, 950], VOCAB, seed=8)
    params = SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True, seed=5, return_routed_experts=True)
    runs = {}
    for graphs in (True, False):
        with engine_of(tiny_path, dtype="float32", num_blocks=256, cuda_graphs=graphs, compile_model="true") as engine:
            if graphs:
                split = engine.runner.long_graphs[2][1]["attention"].split_tokens
                assert 2 * split < 700  # so the long graph is the one replayed
            runs[graphs] = engine.generate(prompts, params)
    assert [o.token_ids for o in runs[True]] == [o.token_ids for o in runs[False]]
    for out in runs[True]:
        want = reference_logprobs(model, out, 1.0)
        torch.testing.assert_close(torch.tensor(out.logprobs), want, rtol=0, atol=1e-4)


def test_mixed_steps_give_the_separate_steps_outputs(tiny_path):
    """Prompts that arrive while others decode (`tests/engine/test_mixed_steps.py`): the running requests' rows
    ride in the prompt's compiled step, then go back to the graphs; tokens equal an engine that keeps the steps
    apart, logprobs and routes a float32 full forward."""
    from .test_mixed_steps import staggered

    model = load_pretrained(tiny_path, dtype=torch.float32)
    params = SamplingParams(temperature=1.0, seed=7, max_new_tokens=10, ignore_eos=True, return_routed_experts=True)
    runs = {
        mixed: staggered(tiny_path, mixed, params, dtype="float32", compile_model="true") for mixed in (True, False)
    }
    (mixed, steps, on), (apart, _, off) = runs[True], runs[False]
    assert on and not off and all(s == list(range(s[0], s[0] + len(s))) for s in steps)
    assert [o.token_ids for o in mixed] == [o.token_ids for o in apart]
    for out in mixed:
        torch.testing.assert_close(torch.tensor(out.logprobs), reference_logprobs(model, out, 1.0), rtol=0, atol=1e-4)
        assert torch.equal(out.routed_experts, reference_routes(model, out).to(out.routed_experts.dtype))


def test_step_graphs_serve_prefills_like_the_eager_steps(tiny_path):
    """Fresh prefills replay the fresh graph of the next token count up (padding to the scratch block, empty
    sequence slots), the first chunk of a long prompt too; its later chunk and prompts after a cached prefix replay
    the ragged graphs (a decode row per token). Logprobs against a float32 full forward, and the first token's
    against an engine without these graphs."""
    model = load_pretrained(tiny_path, dtype=torch.float32)
    batches = [make_prompts(lengths, VOCAB, seed=11 + i) for i, lengths in enumerate([[5], [3, 9, 17, 30, 5], [200]])]
    params = SamplingParams(temperature=1.0, max_new_tokens=4, ignore_eos=True, seed=7, n=2)
    runs, replays = {}, {}
    for tokens in (2048, 0):
        config = {"dtype": "bfloat16", "num_blocks": 256, "max_num_batched_tokens": 128, "prefill_graph_tokens": tokens}
        with engine_of(tiny_path, **config) as engine:
            runs[tokens] = [out for b in batches + batches[1:2] for out in engine.generate(b, params)]
            fresh, ragged = engine.runner.fresh_graphs, engine.runner.ragged_graphs
            replays[tokens] = [g.replays if g is not None else 0 for g in (fresh, ragged)]
            if tokens:
                assert sorted(fresh.graphs) == sorted(ragged.graphs) == [16, 32, 64, 128]
    assert replays[2048][0] >= 3 and replays[2048][1] >= 2 and replays[0] == [0, 0]
    for out, eager in zip(runs[2048], runs[0], strict=True):
        want = reference_logprobs(model, out, 1.0)
        assert (torch.tensor(out.logprobs) - want).abs().max() < 0.1
        if out.token_ids[0] == eager.token_ids[0]:
            assert abs(out.logprobs[0] - eager.logprobs[0]) < 0.05
