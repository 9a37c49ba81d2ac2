"""The compiled decode step (`EngineConfig.compile_model`): on the CPU `torch.compile` traces the same model
and sampler code the GPU's CUDA graphs replay, with attention behind the opaque `leagues::paged_attend`
operator. Its outputs must be the eager engine's: the same tokens for greedy and seeded sampling, logprobs
equal to a full forward, routes recorded for every decoded token.
"""

import pytest
import torch

from leagues.engine import SamplingParams
from leagues.model import load_pretrained

from .reference import engine_of, make_prompts, reference_logprobs, reference_routes

VOCAB = 101


@pytest.mark.slow
def test_compiled_decode_matches_the_eager_engine(tiny_path):
    model = load_pretrained(tiny_path, dtype=torch.float32)
    prompts = make_prompts([3, 9, 17, 30], VOCAB, seed=5)
    runs = {}
    for mode in ("false", "true"):
        with engine_of(tiny_path, num_blocks=128, compile_model=mode) as engine:
            assert engine.runner.compiled == (mode == "true")
            for temperature in (0.0, 1.0):
                params = SamplingParams(
                    temperature=temperature, max_new_tokens=10, ignore_eos=True, seed=3, n=2, return_routed_experts=True
                )
                runs[mode, temperature] = engine.generate(prompts, params)
    for temperature in (0.0, 1.0):
        eager, compiled = runs["false", temperature], runs["true", temperature]
        assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
        for out in compiled:
            want = reference_logprobs(model, out, temperature)
            torch.testing.assert_close(torch.tensor(out.logprobs), want, rtol=0, atol=1e-5)
            assert torch.equal(out.routed_experts, reference_routes(model, out).to(out.routed_experts.dtype))


def test_compile_model_setting_is_checked(tiny_path):
    with pytest.raises(ValueError, match="compile_model"):
        engine_of(tiny_path, compile_model="yes").__enter__()
