"""Sampler: the last-position logits of a batch of sequences in, one next token per sequence out.

Runs after the model runner and before the scheduler appends the tokens. Rows without truncation or top
logprobs (the RL case) go through `sample_in_step`: `sample_plain`'s tokens (`leagues.kernels.sampling`: one
Triton kernel on CUDA), which the decode CUDA graphs also run inside the step (`GraphSampling` carries their
inputs), in deterministic mode too; the rest here is batched and vectorised on the logits' device, with no
per-row Python loop and no host sync.

Decisions:
- Per-row parameters travel as tensors (`SamplingTensors`), built once per step on the host. Python
  flags (`any_top_k`, `any_top_p`, `any_min_p`, `all_greedy`, `max_top_logprobs`) skip unused work;
  they are computed over the sampled rows only, since truncation never affects a greedy row.
- Logprob semantics, defined once in `compute_logprobs`: `log_softmax(logits.float() / T)` with
  T := 1 for greedy rows (temperature 0), *before* top-k/top-p/min-p truncation. The trainer
  recomputes exactly this, so it should call `compute_logprobs` too: dividing by a tensor of
  temperatures is not bitwise the same as dividing by a Python float on CUDA (which multiplies by
  the reciprocal). The top-logprobs come from the same distribution.
- Deterministic mode (`invariant=True`) takes the log-softmax with the trainer's arithmetic,
  `batch_invariant.log_softmax(scale_logits(logits, T))` at the token, as `leagues.train.logprobs` does (T a
  float32 tensor, T := 1 for greedy rows). `invariant_logprobs` is that gather without a second [B, V] tensor,
  so a launched decode step's graph computes it beside `sample_plain`'s tokens (`sample_in_step`).
- Greedy rows (temperature 0) take `argmax(logits)`: ties go to the lowest id.
- Truncation, in order: top-k, top-p over the top-k survivors (renormalised), min-p relative to the
  max probability; the top token is always kept. Top-k and top-p share one stable descending sort (so
  ties rank by id); min-p needs no sort: p / p_max >= min_p is `score - max_score >= log(min_p)`, and
  the ratio does not change when the distribution is renormalised.
- Sampling is the Gumbel-max trick, `argmax(scores + gumbel)` over the kept tokens, which draws from
  the renormalised truncated distribution without ever normalising it.
- The noise comes from a counter-based hash RNG, not a stateful generator: u[b, v] is a pure function
  of (seed_b, step_b, v), with step the number of tokens the sequence has generated so far. So a row
  samples the same token whatever else shares the batch, at whatever index, after preemption and
  recompute, and across engines. The hash is the splitmix64 mixer on int64 tensors (wrap-around
  multiplication; `>>` on int64 is arithmetic, so shifts are masked to make them logical):
      key_b   = mix(seed_b ^ mix(step_b + GOLDEN))
      bits    = mix(key_b + (v + 1) * GOLDEN)          (the splitmix64 stream of key_b, element v)
      u       = (2 * top23(bits) + 1) / 2**24           in (0, 1), exact in float32, never 0 or 1
      gumbel  = -log(-log(u))
  24 bits bound the Gumbel noise to [-2.8, 16.6]: tokens below ~1e-7 probability are slightly
  under-sampled, which is far below anything a rollout can notice.
- Requests without a seed get a random one from the engine at submission (and the n samples of one
  request get distinct derived seeds, passed as `from_params(..., seeds=)`); a sampled row left without a
  seed is a ValueError rather than a silent shared default.

Legend: B rows (sequences in the step), V vocabulary, K top logprobs per row (the batch maximum).
"""

import math
from dataclasses import dataclass

import torch

from leagues.kernels import batch_invariant
from leagues.kernels.sampling import (
    compute_logprobs,
    effective_temperature,
    gumbel_noise,
    hash_uniform,
    int64_pattern,
    mix64,
    sample_plain,
    scale_logits,
)
from leagues.types import SamplingParams

__all__ = [
    "GraphSampling",
    "SampleOutput",
    "SamplingTensors",
    "compute_logprobs",
    "effective_temperature",
    "gumbel_noise",
    "hash_uniform",
    "int64_pattern",
    "invariant_logprobs",
    "is_plain",
    "mix64",
    "row_seed",
    "sample",
    "sample_in_step",
    "samples_in_step",
    "sample_plain",
    "scale_logits",
]


@dataclass(kw_only=True, slots=True)
class SamplingTensors:
    temperature_B: torch.Tensor
    """float32; 0 marks a greedy row."""
    top_p_B: torch.Tensor
    """float32; 1 means off."""
    top_k_B: torch.Tensor
    """int64; <= 0 means off."""
    min_p_B: torch.Tensor
    """float32; 0 means off."""
    seed_B: torch.Tensor
    """int64 (the seed's low 64 bits); 0 for greedy rows without a seed."""
    step_B: torch.Tensor
    """int64; tokens the sequence has generated so far, the RNG counter."""
    any_top_p: bool
    any_top_k: bool
    any_min_p: bool
    all_greedy: bool
    max_top_logprobs: int
    """K: the largest `top_logprobs` in the batch; 0 skips the top-logprob work."""

    @classmethod
    def from_params(
        cls, rows: list[tuple[SamplingParams, int]], device: torch.device | str, seeds: list[int | None] | None = None
    ) -> "SamplingTensors":
        """One row per (params, step counter), in batch order; `seeds`, if given, replaces `params.seed` per row."""
        params = [p for p, _ in rows]
        sampled = [p for p in params if p.temperature > 0]
        seeds = seeds if seeds is not None else [p.seed for p in params]
        if len(seeds) != len(rows):
            raise ValueError(f"seeds: {len(seeds)} seeds for {len(rows)} rows")
        if any(p.temperature > 0 and s is None for p, s in zip(params, seeds, strict=True)):
            raise ValueError("SamplingParams.seed: None for a sampled row (the engine assigns one at submission)")
        device = torch.device(device)
        return cls(
            temperature_B=_to_device([float(p.temperature) for p in params], torch.float32, device),
            top_p_B=_to_device([float(p.top_p) for p in params], torch.float32, device),
            top_k_B=_to_device([int(p.top_k) for p in params], torch.int64, device),
            min_p_B=_to_device([float(p.min_p) for p in params], torch.float32, device),
            seed_B=_to_device([int64_pattern(s or 0) for s in seeds], torch.int64, device),
            step_B=_to_device([int(step) for _, step in rows], torch.int64, device),
            any_top_p=any(p.top_p < 1 for p in sampled),
            any_top_k=any(p.top_k > 0 for p in sampled),
            any_min_p=any(p.min_p > 0 for p in sampled),
            all_greedy=not sampled,
            max_top_logprobs=max((p.top_logprobs for p in params), default=0),
        )


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list to device tensor; pinned on CUDA so the copy is asynchronous."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


@dataclass(slots=True)
class GraphSampling:
    """Per-row sampling inputs of a decode step the graph samples itself (rows without truncation)."""

    temperature: list[float]
    seeds: list[int]
    """Signed int64 patterns (`sampler.int64_pattern`)."""
    steps: list[int]


def row_seed(seed: int, sample_index: int) -> int:
    """The seed of one sample of a request: distinct per sample index."""
    return (seed + sample_index * 0x9E3779B97F4A7C15) % 2**62


def samples_in_step(params: SamplingParams) -> bool:
    """The step itself can sample this row (`sample_in_step`): no truncation and no top logprobs."""
    truncates = params.top_k > 0 or params.top_p < 1 or params.min_p > 0
    return not (params.top_logprobs or (params.temperature > 0 and truncates))


@dataclass(slots=True)
class SampleOutput:
    token_ids_B: torch.Tensor
    """int64."""
    logprobs_B: torch.Tensor
    """float32; the chosen token's logprob under `compute_logprobs`."""
    top_ids_BK: torch.Tensor | None = None
    """int64, by descending logprob; None when `max_top_logprobs` is 0."""
    top_logprobs_BK: torch.Tensor | None = None
    """float32, descending."""


def _top_k_top_p_keep(scores_BV: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Tokens kept by top-k, then top-p over the top-k survivors; bool [B, V], the top token always kept."""
    num_vocab = scores_BV.shape[-1]
    sorted_BV, order_BV = scores_BV.sort(dim=-1, descending=True, stable=True)
    rank_V = torch.arange(num_vocab, device=scores_BV.device)
    k_B = torch.where(t.top_k_B > 0, t.top_k_B, num_vocab)
    keep_BV = rank_V[None, :] < k_B[:, None]
    if t.any_top_p:
        probs_BV = sorted_BV.masked_fill(~keep_BV, -math.inf).softmax(dim=-1)
        mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
        # top_p = 1 keeps everything exactly, whatever rounding the cumulative sum picks up.
        keep_BV &= (mass_before_BV < t.top_p_B[:, None]) | (t.top_p_B[:, None] >= 1)
    keep_BV[:, 0] = True
    return torch.zeros_like(keep_BV).scatter_(1, order_BV, keep_BV)


def _min_p_keep(scores_BV: torch.Tensor, min_p_B: torch.Tensor) -> torch.Tensor:
    """p >= min_p * p_max, in log space: score - max_score >= log(min_p) (min_p = 0 keeps all)."""
    max_B = scores_BV.amax(dim=-1)
    return scores_BV - max_B[:, None] >= torch.log(min_p_B)[:, None]


def _sample_scores(scores_BV: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Gumbel-max over the truncated scores: a draw from the renormalised truncated distribution."""
    if t.any_top_k or t.any_top_p:
        scores_BV = scores_BV.masked_fill(~_top_k_top_p_keep(scores_BV, t), -math.inf)
    if t.any_min_p:
        scores_BV = scores_BV.masked_fill(~_min_p_keep(scores_BV, t.min_p_B), -math.inf)
    noisy_BV = scores_BV + gumbel_noise(t.seed_B, t.step_B, scores_BV.shape[-1])
    return noisy_BV.argmax(dim=-1)


def invariant_logprobs(scores_BV: torch.Tensor, token_ids_B: torch.Tensor) -> torch.Tensor:
    """float32 [B]: the tokens' logprobs, bit for bit `batch_invariant.log_softmax(scores_BV).gather(1,
    token_ids_B[:, None]).squeeze(1)` (the trainer's arithmetic in deterministic mode). On CUDA that log-softmax
    is `x - logsumexp(x)[:, None]`, one subtraction per element: the gathered scores minus their row's
    `batch_invariant.logsumexp` are the same bits, without writing a [B, V] tensor. No host sync (capturable)."""
    if not batch_invariant.uses_triton(scores_BV):
        return batch_invariant.log_softmax(scores_BV).gather(1, token_ids_B[:, None]).squeeze(1)
    scores_BV = scores_BV.float()
    return scores_BV.gather(1, token_ids_B[:, None]).squeeze(1) - batch_invariant.logsumexp(scores_BV)


def sample_in_step(
    logits_BV: torch.Tensor,
    temperature_B: torch.Tensor,
    seed_B: torch.Tensor,
    step_B: torch.Tensor,
    invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens int64, logprobs float32) of rows without truncation, what a launched decode step samples (inside
    its CUDA graph: no host sync): `sample_plain`'s tokens; with `invariant` (deterministic mode) their logprobs
    by the trainer's arithmetic (`invariant_logprobs`), else `sample_plain`'s."""
    token_ids_B, logprobs_B = sample_plain(logits_BV, temperature_B, seed_B, step_B)
    if invariant:
        logprobs_B = invariant_logprobs(scale_logits(logits_BV, temperature_B), token_ids_B)
    return token_ids_B, logprobs_B


def is_plain(t: SamplingTensors) -> bool:
    """No truncation and no top logprobs: `sample_plain` gives `sample`'s answer."""
    return not (t.any_top_k or t.any_top_p or t.any_min_p or t.max_top_logprobs)


def sample(logits_BV: torch.Tensor, t: SamplingTensors, invariant: bool = False) -> SampleOutput:
    """Next token, its logprob, and optionally the top-K logprobs, for every row. `invariant`: the
    log-softmax is batch-invariant (deterministic mode; the trainer computes the same). Batches without
    truncation or top logprobs take `sample_in_step` (one fused kernel on CUDA, the one the decode's CUDA
    graphs run, so a sequence's tokens do not depend on which path sampled them)."""
    if is_plain(t):
        return SampleOutput(*sample_in_step(logits_BV, t.temperature_B, t.seed_B, t.step_B, invariant))
    scores_BV = scale_logits(logits_BV, t.temperature_B)
    logprobs_BV = batch_invariant.log_softmax(scores_BV) if invariant else scores_BV.log_softmax(dim=-1)
    token_ids_B = logits_BV.argmax(dim=-1)
    if not t.all_greedy:
        token_ids_B = torch.where(t.temperature_B > 0, _sample_scores(scores_BV, t), token_ids_B)
    out = SampleOutput(token_ids_B, logprobs_BV.gather(1, token_ids_B[:, None]).squeeze(1))
    if t.max_top_logprobs > 0:
        num_top = min(t.max_top_logprobs, logits_BV.shape[-1])
        out.top_logprobs_BK, out.top_ids_BK = logprobs_BV.topk(num_top, dim=-1)
    return out
