"""The rollout engine end to end on the CPU: greedy parity with `transformers`, logprobs and samples
against a full forward, scheduling variants (prefix cache, preemption, chunked prefill, block sizes)
that must not change outputs, n samples, stop conditions, abort, concurrency and input validation.

Every engine here is real (float32 on the CPU, the torch reference attention); references are either
`transformers.generate` or one packed forward of the whole sequence with the same leagues model.
"""

import asyncio
import json
import shutil
import time

import pytest
import torch
import transformers

from leagues.engine import Engine, FinishReason, SamplingParams
from leagues.model import load_pretrained

from ..model.hf_cases import write_hf_checkpoint
from .reference import GREEDY, engine_of, full_forward, generate_ids, make_prompts, reference_logprobs

VOCAB = 101  # the tiny model's vocabulary


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True, **kw)


# ---- 1. greedy parity with transformers ----


@torch.no_grad()
def hf_greedy(hf_model, prompt: list[int], num_tokens: int) -> list[int]:
    hf_model.generation_config.eos_token_id = None  # so min_new_tokens never masks a token the engine may pick
    ids = torch.tensor([prompt])
    out = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=num_tokens,
        min_new_tokens=num_tokens,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def test_greedy_matches_transformers_tiny(engine, tiny_path):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    prompts = make_prompts([1, 7, 19, 40], VOCAB, seed=11)
    got = generate_ids(engine, prompts, greedy(16))
    assert got == [hf_greedy(hf_model, p, 16) for p in prompts]


@pytest.mark.parametrize("case", ["qwen2_moe", "mixtral", "olmoe", "llama"])
def test_greedy_matches_transformers_families(case, tmp_path):
    hf_model = write_hf_checkpoint(case, tmp_path)
    prompts = make_prompts([2, 9, 23], 96, seed=12)
    with engine_of(load_pretrained(tmp_path), num_blocks=32, block_size=8) as engine:
        got = generate_ids(engine, prompts, greedy(16))
    assert got == [hf_greedy(hf_model, p, 16) for p in prompts]


# ---- 2. logprobs equal a full forward ----


def test_sampled_logprobs_equal_full_forward(engine):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3, max_new_tokens=12, ignore_eos=True)
    outputs = engine.generate(make_prompts([5, 17, 33], VOCAB, seed=13), params)
    for out in outputs:
        assert len(out.token_ids) == len(out.logprobs) == 12
        ref = reference_logprobs(engine.model, out, 0.8)
        torch.testing.assert_close(torch.tensor(out.logprobs), ref, atol=1e-5, rtol=0)
        # top-k 20: every sampled token ranks among the 20 most likely (logprobs are before truncation)
        seq = out.prompt_token_ids + out.token_ids
        logits_OV = full_forward(engine.model, seq[:-1]).logits_TV[len(out.prompt_token_ids) - 1 :]
        ranks = (logits_OV > logits_OV.gather(1, torch.tensor(out.token_ids)[:, None])).sum(-1)
        assert int(ranks.max()) < 20


def test_greedy_logprobs_and_top_logprobs_equal_full_forward(engine):
    outputs = engine.generate(make_prompts([4, 26], VOCAB, seed=14), greedy(10, top_logprobs=3))
    for out in outputs:
        ref = reference_logprobs(engine.model, out, 0.0)  # greedy logprobs are at temperature 1
        torch.testing.assert_close(torch.tensor(out.logprobs), ref, atol=1e-5, rtol=0)
        seq = out.prompt_token_ids + out.token_ids
        logits_OV = full_forward(engine.model, seq[:-1]).logits_TV[len(out.prompt_token_ids) - 1 :]
        assert out.token_ids == logits_OV.argmax(-1).tolist()  # greedy = argmax of the full forward
        top_lp_OK, top_ids_OK = logits_OV.log_softmax(-1).topk(3, dim=-1)
        assert [[t for t, _ in row] for row in out.top_logprobs] == top_ids_OK.tolist()
        got_OK = torch.tensor([[lp for _, lp in row] for row in out.top_logprobs])
        torch.testing.assert_close(got_OK, top_lp_OK, atol=1e-5, rtol=0)


def test_unseeded_sampling_works(engine):
    """A sampled request without a seed gets one from the engine (n samples still differ)."""
    params = SamplingParams(temperature=1, n=3, max_new_tokens=8, ignore_eos=True)
    outputs = engine.generate(make_prompts([6], VOCAB), params)
    assert [len(o.token_ids) for o in outputs] == [8, 8, 8]
    assert len({tuple(o.token_ids) for o in outputs}) > 1


# ---- 3. scheduling variants do not change greedy outputs ----

# lengths around the block boundaries of both block sizes
VARIANT_PROMPTS = make_prompts([1, 4, 16, 17, 31, 45], VOCAB, seed=15)


@pytest.fixture(scope="module")
def baseline(engine):
    """Prefix caching and chunked prefill off, block size 16, a large cache."""
    config = dict(num_blocks=128, block_size=16, enable_prefix_caching=False, chunked_prefill=False)
    with engine_of(engine.model, **config) as plain:
        return generate_ids(plain, VARIANT_PROMPTS)


VARIANTS = {
    "block_size_4": dict(block_size=4, num_blocks=128, enable_prefix_caching=False),
    "chunked_8": dict(chunked_prefill=True, max_num_batched_tokens=8, enable_prefix_caching=False),
    "unchunked_small_budget": dict(chunked_prefill=False, max_num_batched_tokens=8),
    "max_num_seqs_2": dict(max_num_seqs=2),
    "preempt": dict(block_size=4, num_blocks=20, enable_prefix_caching=False),
    "preempt_cached_chunked": dict(block_size=4, num_blocks=20, max_num_batched_tokens=8),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_baseline(variant, engine, baseline):
    config = dict(num_blocks=128, block_size=16) | VARIANTS[variant]
    with engine_of(engine.model, **config) as other:
        assert generate_ids(other, VARIANT_PROMPTS) == baseline
        assert generate_ids(other, VARIANT_PROMPTS) == baseline  # again, now with whatever the cache kept
        if variant.startswith("preempt"):
            assert other.scheduler.num_preemptions > 0
        assert other.blocks.num_free_blocks == other.blocks.num_blocks  # nothing leaked


def test_prefix_cache_hits_match_baseline(engine, baseline):
    engine.flush_cache()
    first = engine.generate(VARIANT_PROMPTS, GREEDY)
    second = engine.generate(VARIANT_PROMPTS, GREEDY)
    assert [o.token_ids for o in first] == [o.token_ids for o in second] == baseline
    # a prompt of n tokens reuses its full blocks except one holding the last token: 16 * ((n - 1) // 16)
    assert [o.num_cached_tokens for o in second] == [16 * ((len(p) - 1) // 16) for p in VARIANT_PROMPTS]


def test_shared_prefix(engine):
    prefix = make_prompts([40], VOCAB, seed=16)[0]
    prompts = [prefix + s for s in make_prompts([1, 3, 20, 7], VOCAB, seed=17)]
    with engine_of(engine.model, num_blocks=128, block_size=16, enable_prefix_caching=False) as plain:
        expected = generate_ids(plain, prompts)
        turn2_prompt = prompts[0] + expected[0] + [5, 6, 7, 8, 9]
        turn2_expected = generate_ids(plain, [turn2_prompt])
    engine.flush_cache()
    first = engine.generate(prompts[:1], GREEDY)
    later = engine.generate(prompts[1:], GREEDY)
    assert [o.token_ids for o in first + later] == expected
    assert first[0].num_cached_tokens == 0
    assert [o.num_cached_tokens for o in later] == [32, 32, 32]  # the prefix's two full blocks
    # a second turn resends the first turn's prompt and output: blocks full of output tokens are cached too
    turn2 = engine.generate([turn2_prompt], GREEDY)[0]
    assert turn2.token_ids == turn2_expected[0]
    assert turn2.num_cached_tokens == 48  # 41 + 12 - 1 computed tokens: 3 full blocks


# ---- 4. n samples ----


def test_n_samples(engine):
    prompt = make_prompts([21], VOCAB, seed=18)[0]  # one full block and a shared partial one (copy-on-write)
    params = SamplingParams(n=4, temperature=1, seed=7, max_new_tokens=10, ignore_eos=True)
    outputs = engine.generate([prompt], params)
    assert [o.index for o in outputs] == [0, 1, 2, 3]
    assert all(o.prompt_token_ids == prompt and len(o.token_ids) == 10 for o in outputs)
    assert len({tuple(o.token_ids) for o in outputs}) >= 3
    for out in outputs:  # each fork's logprobs see its own tokens only, not a sibling's
        torch.testing.assert_close(
            torch.tensor(out.logprobs), reference_logprobs(engine.model, out, 1.0), atol=1e-5, rtol=0
        )

    again = engine.generate([prompt], params)
    assert [o.token_ids for o in again] == [o.token_ids for o in outputs]

    others = make_prompts([3, 30], VOCAB, seed=19)
    mixed_params = [SamplingParams(temperature=0.7, seed=1, n=2, max_new_tokens=6), params, greedy(14)]
    mixed = engine.generate([others[0], prompt, others[1]], mixed_params)
    assert [o.token_ids for o in mixed[2:6]] == [o.token_ids for o in outputs]
    for a, b in zip(mixed[2:6], outputs, strict=True):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_seeded_sample_survives_preemption(engine):
    prompts = make_prompts([9, 14, 30], VOCAB, seed=20)
    params = SamplingParams(n=2, temperature=1, seed=5, max_new_tokens=12, ignore_eos=True)
    expected = generate_ids(engine, prompts, params)
    with engine_of(engine.model, num_blocks=14, block_size=4) as small:
        assert generate_ids(small, prompts, params) == expected
        assert small.scheduler.num_preemptions > 0


# ---- 5. stop conditions ----


def first_new_token_index(tokens: list[int], start: int) -> int:
    """The first index >= start whose token did not occur before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


def test_stop_token_ids_and_eos(engine, tiny_path, tmp_path):
    prompt = make_prompts([8], VOCAB, seed=21)[0]
    ref = generate_ids(engine, [prompt], greedy(16))[0]
    k = first_new_token_index(ref, 3)
    out = engine.generate([prompt], greedy(16, stop_token_ids=[ref[k]]))[0]
    assert out.token_ids == ref[: k + 1] and out.finish_reason == FinishReason.STOP

    # a checkpoint whose eos is that token
    shutil.copytree(tiny_path, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | {"eos_token_id": ref[k]}))
    assert engine.tokenizer.eos_token_id not in ref  # the tokenizer's eos stays an eos too
    with engine_of(tmp_path / "m", num_blocks=16) as eos_engine:
        stopped = eos_engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=16))[0]
        ignored = eos_engine.generate([prompt], greedy(16))[0]
    assert stopped.token_ids == ref[: k + 1] and stopped.finish_reason == FinishReason.STOP
    assert ignored.token_ids == ref and ignored.finish_reason == FinishReason.LENGTH


def test_stop_strings(engine):
    tokenizer = engine.tokenizer
    ref = engine.generate(["The cat sat"], greedy(16))[0]
    text = tokenizer.decode(ref.token_ids, skip_special_tokens=True)
    j = next(j for j in range(3, len(text) - 2) if text.find(text[j : j + 2]) == j)
    stop = text[j : j + 2]
    out = engine.generate(["The cat sat"], greedy(16, stop=["~never~", stop]))[0]
    m = next(m for m in range(1, 17) if stop in tokenizer.decode(ref.token_ids[:m], skip_special_tokens=True))
    assert out.finish_reason == FinishReason.STOP
    assert out.token_ids == ref.token_ids[:m]  # tokens up to the one completing the stop string are kept
    assert out.text == text[:j]  # the text is cut before it
    none = engine.generate(["The cat sat"], greedy(16, stop=["~never~"]))[0]
    assert none.token_ids == ref.token_ids and none.text == text and none.finish_reason == FinishReason.LENGTH


def test_length_limits(engine):
    prompt = make_prompts([8], VOCAB, seed=22)[0]
    ref = generate_ids(engine, [prompt], greedy(16))[0]
    out = engine.generate([prompt], greedy(5))[0]
    assert out.token_ids == ref[:5] and out.finish_reason == FinishReason.LENGTH
    zero = engine.generate([prompt], SamplingParams(max_new_tokens=0, n=2))
    assert [(o.index, o.token_ids, o.logprobs, o.finish_reason) for o in zero] == [
        (0, [], [], FinishReason.LENGTH),
        (1, [], [], FinishReason.LENGTH),
    ]
    assert all(o.arrival_time > 0 and o.first_token_time == 0 for o in zero)  # no token: no first-token time
    before = time.monotonic()
    timed = engine.generate([prompt, prompt[:4]], greedy(3))
    assert all(before <= o.arrival_time < o.first_token_time <= time.monotonic() for o in timed)
    with engine_of(engine.model, num_blocks=16, max_model_len=12) as short:
        longest = make_prompts([11], VOCAB, seed=26)[0]
        capped = short.generate([prompt, longest], greedy(16))
        assert [o.token_ids for o in capped] == [ref[:4], generate_ids(engine, [longest], greedy(1))[0]]
        assert all(o.finish_reason == FinishReason.LENGTH for o in capped)
        with pytest.raises(ValueError, match="limit is 11"):
            short.submit(longest + [5], greedy(1))
    # a sequence that outgrows the whole KV cache ends at its capacity (it used to be preempted forever)
    with engine_of(engine.model, num_blocks=4, block_size=4) as tiny_cache:
        (out,) = tiny_cache.submit(prompt[:5], greedy(20)).result(timeout=30)
    assert out.token_ids == generate_ids(engine, [prompt[:5]], greedy(11))[0]
    assert out.finish_reason == FinishReason.LENGTH


# ---- 6. abort ----


def test_abort(engine):
    long = greedy(2000)
    future = engine.submit(make_prompts([10], VOCAB, seed=23)[0], long, request_id="long")
    forked = engine.submit(
        make_prompts([5], VOCAB, seed=24)[0], SamplingParams(n=3, max_new_tokens=2000, ignore_eos=True), "forked"
    )
    dup = engine.submit([5, 6], greedy(2), request_id="long")
    with pytest.raises(ValueError, match="already in flight"):
        dup.result(timeout=30)
    time.sleep(0.2)
    engine.abort("long")
    engine.abort("forked")
    engine.abort("no-such-request")  # unknown ids are ignored
    (out,) = future.result(timeout=30)
    assert out.finish_reason == FinishReason.ABORT and 0 < len(out.token_ids) < 2000
    assert len(out.logprobs) == len(out.token_ids)
    outs = forked.result(timeout=30)
    assert [o.index for o in outs] == [0, 1, 2] and {o.finish_reason for o in outs} == {FinishReason.ABORT}
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert generate_ids(engine, [[5, 6]], greedy(2))[0] == generate_ids(engine, [[5, 6]], greedy(2))[0]


def test_abort_waiting_request_and_close(engine):
    long = greedy(2000)
    small = Engine(engine.model, num_blocks=64, max_num_seqs=1)
    try:
        running = small.submit([5, 6, 7], long, "running")
        waiting = small.submit([5, 6, 8], long, "waiting")  # max_num_seqs=1: never admitted
        time.sleep(0.1)
        small.abort("waiting")
        (out,) = waiting.result(timeout=30)
        assert out.finish_reason == FinishReason.ABORT and out.token_ids == []
    finally:
        small.close()
    with pytest.raises(RuntimeError, match="closed"):  # in-flight requests fail instead of hanging
        running.result(timeout=30)
    with pytest.raises(RuntimeError, match="closed"):
        small.submit([5], long)


# ---- 9. concurrency ----


def test_concurrent_async_requests(engine):
    prompts = make_prompts([1 + (7 * i) % 50 for i in range(20)], VOCAB, seed=25)
    requests = [(i % 20, 1 + (3 * i) % 12) for i in range(200)]
    expected = [generate_ids(engine, [p], greedy(12))[0] for p in prompts]  # alone, one at a time

    async def run_all():
        calls = [engine.generate_async(prompts[p], greedy(m), request_id=f"c{i}") for i, (p, m) in enumerate(requests)]
        return await asyncio.gather(*calls)

    before = dict(engine.stats)
    results = asyncio.run(run_all())
    for (p, m), outs in zip(requests, results, strict=True):
        assert len(outs) == 1 and outs[0].token_ids == expected[p][:m]
    assert engine.stats["requests"] == before["requests"] + len(requests)
    assert engine.stats["inbox_wait_s"] > before["inbox_wait_s"]  # posted while the loop was stepping: they waited


# ---- 10. bad input ----


def test_bad_input(engine, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([1, VOCAB], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([-1, 5], GREEDY)
    with pytest.raises(ValueError, match="limit is"):
        engine.submit([5] * engine.max_model_len, GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="SamplingParams"):
        engine.generate([[5], [6]], [GREEDY])
    with engine_of(engine.model, num_blocks=4, block_size=4) as small:
        with pytest.raises(ValueError, match="KV cache"):
            small.submit([5] * 14, GREEDY)
        with pytest.raises(ValueError, match="limit is 15"):  # 4 blocks of 4 tokens cap the context
            small.submit([5] * 20, GREEDY)
    write_hf_checkpoint("qwen3", tmp_path)
    with engine_of(load_pretrained(tmp_path), num_blocks=8) as dense:
        with pytest.raises(ValueError, match="MoE"):
            dense.submit([5, 6], greedy(2, return_routed_experts=True))
        with pytest.raises(ValueError, match="tokenizer"):
            dense.submit("text", GREEDY)


def test_an_engine_samples_in_its_steps_over_a_model_another_engine_made_invariant(tiny_path):
    """A deterministic engine turns its model batch-invariant for good; a default engine over the same model object
    still samples in its decode steps (it goes by its own setting)."""
    model = load_pretrained(tiny_path)
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    prompts = make_prompts([4, 11], VOCAB, seed=3)
    with engine_of(model, num_blocks=64, deterministic=True) as first:
        want = [o.token_ids for o in first.generate(prompts, params)]
    assert model.invariant_len
    with engine_of(model, num_blocks=64) as second:
        assert [o.token_ids for o in second.generate(prompts, params)] == want
