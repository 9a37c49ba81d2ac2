"""Overlap scheduling (`EngineConfig.overlap_scheduling`): a decode step is launched before the previous one's
tokens reach the host, its input tokens taken on the device from the previous step's samples. Outputs must
be exactly those of the engine that waits for every step: tokens, logprobs, routes and finish reasons, with
eos stops in flight (discarded rows), preemption, aborts, mixed sampling parameters and compiled steps."""

import threading

import pytest
import torch

from leagues.engine import Engine, SamplingParams

from .reference import engine_of, make_prompts

VOCAB = 101


def _outputs(engine, prompts, params):
    outs = engine.generate(prompts, params)
    return [
        (o.token_ids, o.logprobs, o.finish_reason, o.routed_experts.tolist() if o.routed_experts is not None else None)
        for o in outs
    ]


def assert_same(got, want):
    """Tokens, finish reasons and routes exactly; logprobs to float32 rounding (rows of finished sequences
    still in flight change the step's batch size, and with it the matmuls' rounding)."""
    assert [(t, r, e) for t, _, r, e in got] == [(t, r, e) for t, _, r, e in want]
    for (_, got_lp, _, _), (_, want_lp, _, _) in zip(got, want, strict=True):
        torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp), rtol=0, atol=1e-5)


def _run_both(tiny_path, prompts, params, **config):
    runs = {}
    for overlap in (False, True):
        with engine_of(tiny_path, overlap_scheduling=str(overlap).lower(), **config) as engine:
            runs[overlap] = _outputs(engine, prompts, params), engine.stats["overlapped_steps"]
    return runs


@pytest.mark.parametrize(
    "config",
    [dict(num_blocks=128), dict(block_size=4, num_blocks=24), dict(num_blocks=128, compile_model="true")],
    ids=["default", "preempting", "compiled"],
)
def test_overlap_gives_the_outputs_of_waiting_for_every_step(tiny_path, config):
    prompts = make_prompts([3, 9, 17, 30, 5], VOCAB, seed=11)
    # stop tokens end sequences in flight, so launched rows of finished sequences are discarded
    stop = list(range(10, 25))
    params = [
        SamplingParams(temperature=1.0, max_new_tokens=n, seed=i, n=2, return_routed_experts=True, stop_token_ids=stop)
        for i, n in enumerate([12, 20, 7, 16, 1])
    ]
    runs = _run_both(tiny_path, prompts, params, **config)
    (waiting, none_overlapped), (overlapped, num_overlapped) = runs[False], runs[True]
    assert_same(overlapped, waiting)
    assert none_overlapped == 0 and num_overlapped > 5
    assert any(reason == "stop" for _, _, reason, _ in waiting)  # a stop happened in flight


def test_rows_that_truncate_make_the_engine_wait(tiny_path):
    """A top-p row is sampled after its step: the engine lands the step in flight before running it."""
    prompts = make_prompts([4, 6, 8], VOCAB, seed=12)
    params = [SamplingParams(temperature=1.0, max_new_tokens=10, seed=i, ignore_eos=True) for i in range(3)]
    params[1] = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=5, seed=7, ignore_eos=True)
    runs = _run_both(tiny_path, prompts, params, num_blocks=64)
    assert_same(runs[True][0], runs[False][0])
    assert runs[True][1] > 0


def test_abort_while_a_step_is_in_flight(tiny_path):
    """An abort lands the step in flight first: the aborted request ends with real tokens only, the others
    finish unchanged."""
    prompts = make_prompts([5, 7], VOCAB, seed=13)
    params = SamplingParams(temperature=1.0, max_new_tokens=40, seed=3, ignore_eos=True)
    with engine_of(tiny_path, num_blocks=64, overlap_scheduling="false") as engine:
        expected = engine.generate(prompts[1:], params)[0].token_ids
    with engine_of(tiny_path, num_blocks=64, overlap_scheduling="true") as engine:
        started = threading.Event()

        def on_token(index, token, logprob):
            if token >= 0 and not started.is_set():
                started.set()

        victim = engine.submit(prompts[0], params, request_id="victim", on_token=on_token)
        other = engine.submit(prompts[1], params)
        assert started.wait(timeout=30)
        engine.abort("victim")
        aborted = victim.result(timeout=30)[0]
        assert aborted.finish_reason == "abort"
        assert all(0 <= t < VOCAB for t in aborted.token_ids) and len(aborted.logprobs) == len(aborted.token_ids)
        assert other.result(timeout=30)[0].token_ids == expected
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # nothing leaked


def test_a_bad_overlap_setting_is_refused(tiny_path):
    with pytest.raises(ValueError, match="overlap_scheduling"):
        Engine(tiny_path, num_blocks=16, overlap_scheduling="yes")


def test_deterministic_decode_steps_are_launched_and_overlap_exactly(tiny_path):
    """Deterministic mode launches its decode steps too (sampled in the step, logprobs by the trainer's
    arithmetic) and overlaps them. Its kernels are batch-invariant, so the outputs are bitwise those of the engine
    that waits for every step, although rows of sequences that stopped in flight change the steps' batches."""
    prompts = make_prompts([3, 9, 17, 5], VOCAB, seed=14)
    stop = list(range(10, 25))
    params = [
        SamplingParams(temperature=1.0, max_new_tokens=n, seed=i, n=1 + i % 2, stop_token_ids=stop,
                       return_routed_experts=True)
        for i, n in enumerate([12, 20, 7, 16])
    ]  # fmt: skip
    runs = {}
    for overlap in ("false", "true"):
        config = dict(num_blocks=128, block_size=4, max_num_batched_tokens=8, deterministic=True)
        with engine_of(tiny_path, overlap_scheduling=overlap, **config) as engine:
            runs[overlap] = _outputs(engine, prompts, params), dict(engine.stats)
    (waiting, waiting_stats), (overlapped, overlapped_stats) = runs["false"], runs["true"]
    assert overlapped == waiting  # tokens, logprobs, finish reasons and routes, exactly
    assert waiting_stats["launched_steps"] > 10 and waiting_stats["overlapped_steps"] == 0
    assert overlapped_stats["overlapped_steps"] > 5
    assert len({len(t) for t, _, _, _ in waiting}) > 2  # sequences finished at different steps
    assert any(reason == "stop" for _, _, reason, _ in waiting)  # a stop happened in flight
