"""The fused plain sampler (`leagues.kernels.sampling`): the Triton kernel against the torch reference (under
Triton's interpreter without a GPU), the reference against the engine's full sampler, and the operator's
behaviour under `torch.compile`.

Legend: B rows, V vocabulary.
"""

import os

import pytest
import torch

from leagues.engine.sampler import SamplingTensors, sample
from leagues.kernels import sampling
from leagues.types import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rows(num_rows: int, seed: int = 0):
    """Logits with a forced tie (row 1), a mix of greedy and sampled rows, distinct seeds and step counters."""
    gen = torch.Generator().manual_seed(seed)
    logits_BV = torch.randn(num_rows, 300, generator=gen) * 3
    logits_BV[1, [5, 250]] = 40.0  # greedy row 1: a tie across two blocks goes to the lower id
    temperature_B = torch.tensor([1.0, 0.0, 0.7, 1.3, 0.0, 1.0, 2.0, 1.0][:num_rows])
    seed_B = torch.tensor([sampling.int64_pattern(0xDEADBEEF12345678 * (b + 1)) for b in range(num_rows)])
    step_B = torch.arange(num_rows, dtype=torch.int64) * 17
    return logits_BV, temperature_B, seed_B, step_B


def test_reference_equals_the_full_sampler_without_truncation():
    logits_BV, temperature_B, seed_B, step_B = _rows(8)
    params = [SamplingParams(temperature=float(t), seed=0) for t in temperature_B]
    t = SamplingTensors.from_params([(p, int(s)) for p, s in zip(params, step_B, strict=True)], "cpu")
    t.seed_B = seed_B
    tokens_B, logprobs_B = sampling.sample_plain_reference(logits_BV, temperature_B, seed_B, step_B)
    # the full sampler's truncating path with every truncation off: the old arithmetic, step by step
    t.any_top_k = True
    full = sample(logits_BV, t)
    assert torch.equal(tokens_B, full.token_ids_B)
    assert torch.equal(logprobs_B, full.logprobs_B)
    assert tokens_B[1].item() == 5


@pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter")
def test_triton_kernel_matches_the_reference():
    pytest.importorskip("triton")
    # 64: ties span tiles; split 128: a row over three programs (the tie of row 1 across two of them)
    cases = ((slice(0, 8), 64, None), (slice(1, 2), 64, None), (slice(2, 3), None, None), (slice(0, 8), 64, 128))
    for rows, block, split in cases:
        args = [x[rows].to(DEVICE) for x in _rows(8, seed=rows.start)]
        want_tokens, want_logprobs = sampling.sample_plain_reference(*args)
        got_tokens, got_logprobs = sampling.sample_plain_triton(*args, block=block, split=split)
        assert torch.equal(got_tokens, want_tokens)
        torch.testing.assert_close(got_logprobs, want_logprobs, rtol=0, atol=1e-5)


def test_operator_is_opaque_to_the_compiler_and_gives_the_eager_answer():
    args = _rows(8, seed=3)
    compiled = torch.compile(lambda *a: sampling.sample_plain(*a), fullgraph=True, dynamic=True)
    for num_rows in (8, 5):
        part = [x[:num_rows] for x in args]
        eager, traced = sampling.sample_plain(*part), compiled(*part)
        assert torch.equal(eager[0], traced[0]) and torch.equal(eager[1], traced[1])
