"""Routing capture: the experts the engine records for every computed token equal those of one full
forward of the sequence (minus its last token, which is never computed), whether the prompt was
computed in this request, served from the prefix cache, chunked, recomputed after preemption, or
shared by forked samples.
"""

import pytest
import torch

from leagues.engine import SamplingParams

from .reference import engine_of, make_prompts, reference_routes

PROMPTS = make_prompts([2, 17, 38], 101, seed=40)


def check_routes(model, outputs) -> None:
    cfg = model.config
    for out in outputs:
        num_tokens = len(out.prompt_token_ids) + len(out.token_ids) - 1
        assert out.routed_experts.shape == (num_tokens, cfg.num_moe_layers, cfg.top_k)
        assert out.routed_experts.dtype == torch.uint8
        assert torch.equal(out.routed_experts, reference_routes(model, out))


def test_routes_equal_full_forward(engine):
    engine.flush_cache()
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True, return_routed_experts=True)
    first = engine.generate(PROMPTS, params)
    check_routes(engine.model, first)
    again = engine.generate(PROMPTS, params)  # prompts now come from the prefix cache
    assert [o.num_cached_tokens for o in again] == [0, 16, 32]
    check_routes(engine.model, again)
    assert engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))[0].routed_experts is None


def test_routes_of_forked_samples(engine):
    params = SamplingParams(n=3, temperature=1, seed=2, max_new_tokens=8, ignore_eos=True, return_routed_experts=True)
    outputs = engine.generate(PROMPTS[1:], params)
    assert len({tuple(o.token_ids) for o in outputs[:3]}) > 1
    check_routes(engine.model, outputs)


@pytest.mark.parametrize("chunked", [True, False])
def test_routes_with_preemption_and_chunks(engine, chunked):
    config = dict(num_blocks=16, block_size=4, max_num_batched_tokens=8, chunked_prefill=chunked)
    params = SamplingParams(n=2, temperature=1, seed=3, max_new_tokens=12, ignore_eos=True, return_routed_experts=True)
    with engine_of(engine.model, **config) as small:
        outputs = small.generate(PROMPTS, params)
        assert small.scheduler.num_preemptions > 0
    check_routes(engine.model, outputs)
