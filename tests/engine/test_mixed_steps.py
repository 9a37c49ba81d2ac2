"""Mixed steps (`EngineConfig.mixed_steps`): a request that arrives while others decode has its prompt computed
in a step that also computes the others' next tokens. Arrivals are made deterministic by submitting each new
request from the running one's token callback (on the engine's thread, so it lands before the next step). The
outputs equal those of an engine that keeps prefill and decode steps apart, and a full forward's, without
stalling the requests already running."""

import pytest
import torch

from leagues.engine import Engine, SamplingParams

from .reference import engine_of, make_prompts, reference_logprobs, reference_routes

PROMPTS = make_prompts([5, 23, 9, 40], 101, seed=61)


def staggered(model, mixed: bool, params: SamplingParams, prepare=None, **config):
    """Request 0 first; request i + 1 arrives once request i has sampled 3 tokens. The outputs, the index of the
    engine step each request's tokens came from, and whether the engine mixed steps. `prepare(engine)` runs
    before the first request."""
    with engine_of(model, num_blocks=128, block_size=16, mixed_steps=mixed, **config) as engine:
        if prepare is not None:
            prepare(engine)
        futures, steps = [], [[] for _ in PROMPTS]

        def arrive_after(i: int):
            seen = []

            def on_token(index, token, logprob):
                seen.append(token)
                steps[i].append(engine.stats["steps"])  # called before the step is counted: its index
                if len(seen) == 3 and i + 1 < len(PROMPTS):
                    submit(i + 1)

            return on_token

        def submit(i: int):
            futures.append(engine.submit(PROMPTS[i], params, f"r{i}", arrive_after(i)))

        submit(0)
        while len(futures) < len(PROMPTS):
            futures[-1].result(timeout=60)  # the last one so far has finished or has let the next one in
        outputs = [o for f in futures for o in f.result(timeout=60)]
        return outputs, steps, engine.scheduler.mixed


def test_staggered_arrivals_give_the_same_outputs_in_fewer_steps(engine):
    params = SamplingParams(temperature=1.0, seed=7, max_new_tokens=10, ignore_eos=True, return_routed_experts=True)
    mixed, mixed_steps, on = staggered(engine.model, True, params)
    apart, apart_steps, off = staggered(engine.model, False, params)
    assert on and not off
    assert [o.token_ids for o in mixed] == [o.token_ids for o in apart]
    for ours, theirs in zip(mixed, apart, strict=True):
        torch.testing.assert_close(torch.tensor(ours.logprobs), torch.tensor(theirs.logprobs), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(ours.logprobs), reference_logprobs(engine.model, ours, 1.0),
                                   rtol=0, atol=1e-4)  # fmt: skip
        assert torch.equal(ours.routed_experts, reference_routes(engine.model, ours))
    # mixed, every request samples a token in every step from its first to its last: an arrival's prompt step
    # carries the others' decode rows; apart, each arrival costs the requests running then a step
    assert all(s == list(range(s[0], s[0] + len(s))) for s in mixed_steps)
    assert sum(s[-1] - s[0] + 1 - len(s) for s in apart_steps) == 6  # 3 arrivals during r0, 2 during r1, 1 during r2


def test_deterministic_mode_keeps_prefill_and_decode_apart(tiny_path):
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    _, _, on = staggered(tiny_path, True, params, deterministic=True)  # a model of its own: it turns invariant
    assert not on


def test_a_full_cache_never_preempts_in_a_mixed_step(engine):
    """Decode rows without a free block wait for the decode step (which may preempt); outputs are unchanged."""
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    tight = dict(num_blocks=9, block_size=4, enable_prefix_caching=False)
    with engine_of(engine.model, num_blocks=128, block_size=16, mixed_steps=False) as plain:
        want = [o.token_ids for o in plain.generate(PROMPTS[:3], params)]
    for mixed in (True, False):
        with engine_of(engine.model, mixed_steps=mixed, **tight) as small:
            assert [o.token_ids for o in small.generate(PROMPTS[:3], params)] == want
            assert small.scheduler.num_preemptions > 0
            assert small.blocks.num_free_blocks == small.blocks.num_blocks


def _arrivals_during_the_first(model, **config):
    """Request 0 first; requests 1, 2 and 3 arrive as it samples its first, second and third tokens. The outputs
    and the index of the engine step each request's tokens came from."""
    params = SamplingParams(temperature=1.0, seed=3, max_new_tokens=8, ignore_eos=True)
    with engine_of(model, num_blocks=128, block_size=16, **config) as engine:
        futures, steps = [], [[] for _ in PROMPTS]

        def submit(i: int):
            def on_token(index, token, logprob):
                steps[i].append(engine.stats["steps"])
                if i == 0 and len(steps[0]) <= 3:
                    submit(len(steps[0]))

            futures.append(engine.submit(PROMPTS[i], params, f"r{i}", on_token))

        submit(0)
        futures[0].result(timeout=60)
        return [o for f in futures for o in f.result(timeout=60)], steps


@pytest.mark.parametrize("overlap", ["false", "true"])
def test_deferred_admission_groups_staggered_arrivals_into_one_prefill_step(engine, overlap):
    """`admit_after_decode_steps`: the three arrivals wait for the running request's decode steps and share one
    prefill step (at once, each has its own); the outputs are the same, and request 0 decodes without a gap."""
    now, now_steps = _arrivals_during_the_first(engine.model, overlap_scheduling=overlap)
    later, later_steps = _arrivals_during_the_first(
        engine.model, overlap_scheduling=overlap, admit_after_decode_steps=4
    )
    assert [o.token_ids for o in later] == [o.token_ids for o in now]
    for run, outputs in (("at once", now), ("deferred", later)):
        for o in outputs:
            want = reference_logprobs(engine.model, o, 1.0)
            torch.testing.assert_close(
                torch.tensor(o.logprobs), want, rtol=0, atol=1e-4, msg=lambda m, run=run: f"{run}: {m}"
            )
    # at once: a prefill step for each arrival the step before it saw (overlapped, the last two arrive together)
    prefills = {s[0] for s in now_steps[1:]}
    assert len(prefills) == (3 if overlap == "false" else 2)
    assert {s[0] for s in later_steps[1:]} == {5}  # deferred: one, after r0's prefill and its four decode steps
    assert later_steps[0][:5] == [0, 1, 2, 3, 4]
    gaps = [set(range(steps[0][0], steps[0][-1] + 1)) - set(steps[0]) for steps in (now_steps, later_steps)]
    assert gaps == [prefills, {5}]  # r0 skips exactly the prefill steps
    with pytest.raises(ValueError, match="admit_after_decode_steps: expected >= 0, got -1"):
        Engine(engine.model, admit_after_decode_steps=-1)
