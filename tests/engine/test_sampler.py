"""Sampler: greedy, logprob semantics, truncation, the hash RNG against a pure-Python splitmix64,
batch invariance, reproducibility, and empirical distributions against their exact references.

Legend: B rows, V vocabulary, K top logprobs.
"""

import math

import pytest
import torch

from leagues.engine.sampler import (
    SamplingTensors,
    compute_logprobs,
    hash_uniform,
    invariant_logprobs,
    sample,
    sample_in_step,
    sample_plain,
    scale_logits,
)
from leagues.kernels import batch_invariant
from leagues.types import SamplingParams

MASK64 = (1 << 64) - 1
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
# Distinct probabilities, none near a top-p boundary used below (sorted: .36 .22 .15 .11 .07 .05 .03 .01).
PROBS_V = torch.tensor([0.11, 0.36, 0.05, 0.22, 0.01, 0.15, 0.03, 0.07], dtype=torch.float64)


def params(temperature: float = 1.0, seed: int | None = 0, **kw) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, **kw)


def tensors(rows: list[tuple[SamplingParams, int]]) -> SamplingTensors:
    return SamplingTensors.from_params(rows, "cpu")


def random_logits(num_rows: int, num_vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, num_vocab, generator=torch.Generator().manual_seed(seed)) * 3


# ---- greedy and logprob semantics ----


def test_greedy_is_argmax_with_logprob_at_temperature_one():
    logits_BV = random_logits(16, 50)
    logits_BV[3, [7, 20]] = 100.0  # a tie: the lowest id wins, like torch.argmax
    out = sample(logits_BV, tensors([(params(0.0, seed=None), 5)] * 16))
    assert torch.equal(out.token_ids_B, logits_BV.argmax(-1))
    assert out.token_ids_B[3] == 7
    expected_B = torch.log_softmax(logits_BV.float(), -1).gather(1, out.token_ids_B[:, None]).squeeze(1)
    assert torch.equal(out.logprobs_B, expected_B)
    assert out.top_ids_BK is None and out.top_logprobs_BK is None


@pytest.mark.parametrize("trunc", [{}, {"top_k": 2}, {"top_p": 0.5}, {"min_p": 0.3}, {"top_k": 2, "top_p": 0.5}])
def test_logprob_is_before_truncation(trunc):
    logits_BV = random_logits(64, 30, seed=1)
    rows = [(params(0.7, seed=s, **trunc), s % 5) for s in range(64)]
    out = sample(logits_BV, tensors(rows))
    reference_BV = torch.log_softmax(logits_BV.float() / 0.7, -1)
    torch.testing.assert_close(out.logprobs_B, reference_BV.gather(1, out.token_ids_B[:, None]).squeeze(1))
    exact_BV = compute_logprobs(logits_BV, torch.full((64,), 0.7))
    assert torch.equal(out.logprobs_B, exact_BV.gather(1, out.token_ids_B[:, None]).squeeze(1))


def test_bf16_logits_use_float32_logprobs():
    logits_BV = random_logits(8, 40).bfloat16()
    out = sample(logits_BV, tensors([(params(0.9, seed=s), 0) for s in range(8)]))
    expected_BV = torch.log_softmax(logits_BV.float() / 0.9, -1)
    assert out.logprobs_B.dtype == torch.float32
    torch.testing.assert_close(out.logprobs_B, expected_BV.gather(1, out.token_ids_B[:, None]).squeeze(1))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        # the CUDA formula (gathered scores minus the Triton logsumexp), on the CPU in Triton's interpreter
        pytest.param("triton-cpu", marks=pytest.mark.skipif(batch_invariant.triton is None, reason="needs triton")),
        pytest.param(
            "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
        ),
    ],
)
def test_invariant_logprobs_are_the_batch_invariant_log_softmax_bit_for_bit(device, monkeypatch):
    if device == "triton-cpu":
        monkeypatch.setattr(batch_invariant, "uses_triton", lambda x: True)
    on = "cuda" if device == "cuda" else "cpu"
    temperature_B = torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0, 0.4], device=on)
    scores_BV = scale_logits(random_logits(6, 5000, seed=3).to(on), temperature_B)  # > one Triton block of V
    token_ids_B = torch.tensor([0, 4999, 17, 2500, 4096, 1], device=on)
    want_B = batch_invariant.log_softmax(scores_BV).gather(1, token_ids_B[:, None]).squeeze(1)
    assert torch.equal(invariant_logprobs(scores_BV, token_ids_B), want_B)


def test_deterministic_plain_rows_take_the_steps_tokens_and_the_invariant_logprobs():
    """`sample(invariant=True)` of rows without truncation: `sample_plain`'s tokens (the launched step's), their
    logprobs by `invariant_logprobs`; the step's own sampler (`sample_in_step`) gives the same."""
    logits_BV = random_logits(8, 40, seed=4)
    rows = [(params(t, seed=s), s) for s, t in enumerate([1.0, 0.0, 0.8, 1.0, 1.5, 0.0, 1.0, 0.6])]
    t = tensors(rows)
    out = sample(logits_BV, t, invariant=True)
    tokens_B, _ = sample_plain(logits_BV, t.temperature_B, t.seed_B, t.step_B)
    assert torch.equal(out.token_ids_B, tokens_B)
    assert torch.equal(out.logprobs_B, invariant_logprobs(scale_logits(logits_BV, t.temperature_B), tokens_B))
    in_step = sample_in_step(logits_BV, t.temperature_B, t.seed_B, t.step_B, invariant=True)
    assert torch.equal(in_step[0], out.token_ids_B) and torch.equal(in_step[1], out.logprobs_B)


def test_top_logprobs_sorted_and_from_the_same_distribution():
    logits_BV = random_logits(6, 40, seed=2)
    temps = [0.0, 0.7, 1.0, 1.5, 0.0, 0.3]
    rows = [(params(t, seed=i, top_logprobs=i, top_k=3), 0) for i, t in enumerate(temps)]
    out = sample(logits_BV, tensors(rows))
    assert out.top_ids_BK.shape == (6, 5) and out.top_ids_BK.dtype == torch.int64
    for b, t in enumerate(temps):
        expected = torch.log_softmax(logits_BV[b] / (t or 1.0), -1).topk(5)
        torch.testing.assert_close(out.top_logprobs_BK[b], expected.values)
        assert torch.equal(out.top_ids_BK[b], expected.indices)
    assert (out.top_logprobs_BK.diff(dim=-1) <= 0).all()


# ---- truncation ----


def test_top_k_one_is_greedy():
    logits_BV = random_logits(128, 64, seed=3)
    logits_BV[5, [9, 40]] = 50.0  # a tie: the stable sort ranks the lowest id first, as argmax does
    out = sample(logits_BV, tensors([(params(1.3, seed=s, top_k=1), s) for s in range(128)]))
    assert torch.equal(out.token_ids_B, logits_BV.argmax(-1))


@pytest.mark.parametrize(
    "trunc",
    [{"top_k": 3}, {"top_p": 0.6}, {"min_p": 0.3}, {"top_k": 5, "top_p": 0.8, "min_p": 0.2}],
)
def test_truncation_never_picks_a_truncated_token(trunc):
    num_rows = 4000
    logits_BV = PROBS_V.log().float().expand(num_rows, -1)
    out = sample(logits_BV, tensors([(params(1.0, seed=s, **trunc), s % 7) for s in range(num_rows)]))
    kept_V = truncated_reference(PROBS_V, **trunc) > 0
    assert kept_V[out.token_ids_B].all()
    assert len(out.token_ids_B.unique()) == int(kept_V.sum())  # and every kept token does come up


def test_mixed_batch_truncates_per_row():
    logits_BV = PROBS_V.log().float().expand(3000, -1)
    kinds = [{"top_k": 1}, {"top_p": 0.4}, {}]
    rows = [(params(1.0, seed=s, **kinds[s % 3]), 0) for s in range(3000)]
    token_ids_B = sample(logits_BV, tensors(rows)).token_ids_B
    assert (token_ids_B[0::3] == 1).all()
    assert set(token_ids_B[1::3].tolist()) == {1, 3}
    assert len(token_ids_B[2::3].unique()) == 8


# ---- RNG, reproducibility, batch invariance ----


def splitmix64_mix(x: int) -> int:
    x = ((x ^ (x >> 30)) * MIX1) & MASK64
    x = ((x ^ (x >> 27)) * MIX2) & MASK64
    return x ^ (x >> 31)


def reference_uniform(seed: int, step: int, v: int) -> float:
    key = splitmix64_mix((seed & MASK64) ^ splitmix64_mix((step + GOLDEN) & MASK64))
    bits = splitmix64_mix((key + (v + 1) * GOLDEN) & MASK64)
    return (2 * (bits >> 41) + 1) / 2**24


def test_hash_matches_pure_python_splitmix64():
    seeds = [0, 1, 12345, 2**63 - 1, -1, -(2**63)]
    steps = [0, 1, 7, 2**40]
    seed_B = torch.tensor([s for s in seeds for _ in steps], dtype=torch.int64)
    step_B = torch.tensor([t for _ in seeds for t in steps], dtype=torch.int64)
    u_BV = hash_uniform(seed_B, step_B, 37)
    expected = [[reference_uniform(s, t, v) for v in range(37)] for s in seeds for t in steps]
    assert torch.equal(u_BV.double(), torch.tensor(expected, dtype=torch.float64))


def test_hash_uniform_is_open_and_uniform():
    u_BV = hash_uniform(torch.arange(64), torch.arange(64) * 3, 4096)
    assert (u_BV > 0).all() and (u_BV < 1).all()
    counts = torch.histc(u_BV, bins=16, min=0, max=1)
    expected = u_BV.numel() / 16
    assert ((counts - expected) ** 2 / expected).sum() < 50  # chi-square, 15 dof
    assert abs(u_BV.mean().item() - 0.5) < 2e-3


def test_same_seed_and_step_reproduce_and_others_differ():
    logits_BV = torch.zeros(1, 1000).expand(200, -1)  # uniform: every draw is decided by the noise
    rows = [(params(1.0, seed=42), step) for step in range(100)] + [(params(1.0, seed=43), s) for s in range(100)]
    first_B = sample(logits_BV, tensors(rows)).token_ids_B
    assert torch.equal(first_B, sample(logits_BV, tensors(rows)).token_ids_B)
    assert len(first_B[:100].unique()) > 90  # different steps differ
    assert (first_B[:100] != first_B[100:]).sum() > 90  # different seeds differ


def test_row_result_is_batch_invariant():
    num_vocab = 50
    target = (params(0.8, seed=2024, top_k=10, top_p=0.9, min_p=0.05, top_logprobs=3), 17)
    target_V = random_logits(1, num_vocab, seed=9)[0]
    alone = sample(target_V[None], tensors([target]))
    others = [(params(t, seed=i, top_k=i % 4, top_logprobs=i % 6), i * 3) for i, t in enumerate([0.0, 1.2, 0.5] * 4)]
    logits_BV = random_logits(13, num_vocab, seed=10)
    logits_BV[9] = target_V
    batch = sample(logits_BV, tensors(others[:9] + [target] + others[9:]))
    assert batch.token_ids_B[9] == alone.token_ids_B[0]
    assert torch.equal(batch.logprobs_B[9], alone.logprobs_B[0])
    assert torch.equal(batch.top_ids_BK[9, :3], alone.top_ids_BK[0])
    assert torch.equal(batch.top_logprobs_BK[9, :3], alone.top_logprobs_BK[0])


# ---- empirical distributions ----


def truncated_reference(probs_V: torch.Tensor, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Top-k, top-p over the survivors, min-p against the max, renormalised: a plain loop, float64."""
    order = sorted(range(len(probs_V)), key=lambda v: -probs_V[v].item())
    kept = order[:top_k] if top_k > 0 else order
    mass, total, nucleus = 0.0, sum(probs_V[v].item() for v in kept), []
    for v in kept:
        if mass < top_p:
            nucleus.append(v)
        mass += probs_V[v].item() / total
    p_max = probs_V[nucleus[0]].item()
    out_V = torch.zeros_like(probs_V)
    for v in nucleus:
        if probs_V[v] >= min_p * p_max:
            out_V[v] = probs_V[v]
    return out_V / out_V.sum()


def empirical(logits_V: torch.Tensor, num_draws: int, **kw) -> torch.Tensor:
    """Frequencies over num_draws rows: distinct seeds, and the steps run through as well."""
    rows = [(params(seed=1000 + s // 4, **kw), s % 4) for s in range(num_draws)]
    token_ids_B = sample(logits_V.expand(num_draws, -1), tensors(rows)).token_ids_B
    return torch.bincount(token_ids_B, minlength=len(logits_V)).double() / num_draws


def assert_matches(freq_V: torch.Tensor, probs_V: torch.Tensor, num_draws: int):
    assert (freq_V[probs_V == 0] == 0).all()
    kept = probs_V > 0
    chi2 = (num_draws * (freq_V[kept] - probs_V[kept]) ** 2 / probs_V[kept]).sum().item()
    assert chi2 < 30, chi2  # p < 1e-4 for up to 8 dof; seeds are fixed, so this is deterministic
    assert (freq_V - probs_V).abs().max() < 0.01


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_distribution_matches_softmax(temperature):
    num_draws = 40000
    logits_V = PROBS_V.log().float() * 1.3 + 0.5
    freq_V = empirical(logits_V, num_draws, temperature=temperature)
    assert_matches(freq_V, torch.softmax(logits_V.double() / temperature, -1), num_draws)


@pytest.mark.parametrize(
    "trunc",
    [{"top_k": 3}, {"top_p": 0.6}, {"top_p": 0.8}, {"min_p": 0.25}, {"top_k": 5, "top_p": 0.8, "min_p": 0.2}],
)
def test_distribution_matches_truncated_reference(trunc):
    num_draws = 40000
    freq_V = empirical(PROBS_V.log().float(), num_draws, **trunc)
    assert_matches(freq_V, truncated_reference(PROBS_V, **trunc), num_draws)


# ---- SamplingTensors ----


def test_from_params_fields_and_flags():
    rows = [
        (params(0.0, seed=None, top_k=5, top_p=0.5, min_p=0.5, top_logprobs=7), 3),  # greedy: truncation ignored
        (params(0.8, seed=2**64 + 5, top_logprobs=2), 11),
        (params(1.0, seed=-1, top_k=0), 0),
    ]
    t = tensors(rows)
    assert t.temperature_B.dtype == torch.float32 and t.seed_B.dtype == torch.int64 and t.step_B.dtype == torch.int64
    assert t.seed_B.tolist() == [0, 5, -1] and t.step_B.tolist() == [3, 11, 0]
    assert t.top_k_B.tolist() == [5, -1, 0]
    assert (t.any_top_k, t.any_top_p, t.any_min_p, t.all_greedy, t.max_top_logprobs) == (False, False, False, False, 7)
    t = tensors([(params(0.5, top_k=4), 0), (params(0.5, top_p=0.9), 0), (params(0.5, min_p=0.1), 0)])
    assert (t.any_top_k, t.any_top_p, t.any_min_p, t.all_greedy, t.max_top_logprobs) == (True, True, True, False, 0)
    assert tensors([(params(0.0, seed=None), 0)]).all_greedy


def test_from_params_rejects_an_unseeded_sampled_row():
    with pytest.raises(ValueError, match="seed"):
        tensors([(params(1.0, seed=None), 0)])
    rows = [(params(1.0, seed=None), 0), (params(0.5, seed=3), 0)]
    assert SamplingTensors.from_params(rows, "cpu", seeds=[7, 8]).seed_B.tolist() == [7, 8]
    with pytest.raises(ValueError, match="seeds"):
        SamplingTensors.from_params(rows, "cpu", seeds=[7])


def test_top_logprobs_clamped_to_vocab():
    out = sample(random_logits(2, 4), tensors([(params(0.0, seed=None, top_logprobs=20), 0)] * 2))
    assert out.top_ids_BK.shape == (2, 4)
    assert math.isclose(out.top_logprobs_BK[0].exp().sum().item(), 1.0, rel_tol=1e-5)
