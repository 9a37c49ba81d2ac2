"""Rollout of one step's prompts: generate n samples per prompt through an engine client, score them,
filter groups (DAPO dynamic sampling), shape overlong responses, and report what happened.

    prompts ──► Sample per (prompt, k) ──► generate_fn(ctx, sample) ──► rewards ──► dynamic-sampling filter
                 (group_id, seed)          (default: single turn)       (scorer)      (until the batch is full)

Where it sits: the RL loop calls `rollout(...)` on every rank with that rank's share of prompts (a prompt's
group stays on one rank, so group statistics need no traffic); it reaches the engine only through an
`EngineClient` (in-process or HTTP), so the same code rolls out against any engine.

Decisions:
- The generate-function protocol is `async def generate(ctx, sample) -> Sample`: it gets a sample with its
  prompt, group and seed filled in and returns it with the response, rollout logprobs, loss mask, status
  and weight version set. Users replace it (`RolloutConfig.generate_fn = "module:function"`) for multi-turn
  agents; every sample of a step is generated concurrently, so the engine batches them.
- Each sample gets its own seed from (run seed, step, group, index): whatever else shares the batch, the
  same step of the same run samples the same tokens (the engine's sampler is counter-based per request).
- A generation that raises marks its sample FAILED with the error kept; failed samples take no part in
  training and are counted. The run only stops if every sample of a step failed.
- Dynamic sampling draws further rounds of prompts until `batch_size` groups have non-zero reward
  variance (or `max_rounds` is reached, when it keeps what it has, saying so in the metrics); a group with
  zero variance has zero advantage and only dilutes the batch.
- Overlong handling: "filter" keeps truncated samples out of the loss (their loss mask is zeroed);
  "penalty" is DAPO's soft overlong punishment, a linear penalty over the last `overlong_buffer` tokens.

Legend: G groups (prompts) of K samples.
"""

import asyncio
import math
import statistics
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from leagues.config import load_named
from leagues.engine.client import EngineClient
from leagues.rollout.data import Prompt
from leagues.rollout.rewards import RewardScorer
from leagues.types import FinishReason, Sample, SampleStatus, SamplingParams

OVERLONG = ("none", "filter", "penalty")


@dataclass(kw_only=True, slots=True)
class RolloutConfig:
    batch_size: int = 32
    """Prompt groups per step, over all ranks."""
    n_samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_response_len: int = 256
    """New tokens per response at most (truncated beyond)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards all equal and draw more prompts until the batch is full."""
    max_rounds: int = 4
    """Draws of prompts per step at most when dynamic sampling."""
    overlong: Literal["none", "filter", "penalty"] = "none"
    """Truncated responses: none (trained as they are), filter (kept out of the loss), penalty (DAPO soft
    overlong punishment over the last `overlong_buffer` tokens of the length budget)."""
    overlong_buffer: int = 0
    """Tokens before `max_response_len` where the overlong penalty starts (penalty only)."""
    overlong_penalty: float = 1.0
    """Reward subtracted at the full length (penalty only); it rises linearly over the buffer."""
    return_routes: bool = False
    """Record each token's routed experts per MoE layer on the samples (for routing replay)."""
    generate_fn: str = ""
    """'module:function' of a custom `async def generate(ctx, sample) -> Sample`; empty: single turn."""
    pass_threshold: float = 1.0
    """A sample passes when its reward is at least this (the pass-rate metric)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings of every response."""
    partial: bool = False
    """Partial rollout: the rollout stops once the batch's groups are complete, aborts the rest and carries
    unfinished samples into the next step, continuing them under the new weights (their prompt is the prompt
    plus the response so far, their budget what is left of `max_response_len`). Colocated runs only; not with
    deterministic mode, dynamic sampling or a custom `generate_fn`."""
    over_sample: float = 0.0
    """Partial rollout: fraction of extra prompt groups in flight each step (ceil(groups x (1 + over_sample))
    counting the carried ones), so the batch fills with the groups that finish first."""
    partial_mask_old: bool = True
    """Partial rollout: response tokens sampled under older weights than the step's get loss mask 0. False:
    they are trained; with `trainer.old_logprobs rollout` the PPO ratio against their rollout logprobs (from
    the older weights) weights and clips them; with `recompute` (default) the ratio is against the current
    policy and only `trainer.loss.off_policy` (tis, mis, ...) corrects for the version gap."""

    def __post_init__(self) -> None:
        checks = {
            "batch_size": self.batch_size >= 1,
            "n_samples_per_prompt": self.n_samples_per_prompt >= 1,
            "temperature": self.temperature >= 0,
            "max_response_len": self.max_response_len >= 1,
            "max_rounds": self.max_rounds >= 1,
            "overlong": self.overlong in OVERLONG,
            "overlong_buffer": 0 <= self.overlong_buffer <= self.max_response_len,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"RolloutConfig.{key}: invalid value {getattr(self, key)!r}")
        if self.overlong == "penalty" and self.overlong_buffer == 0:
            raise ValueError("RolloutConfig.overlong_buffer: the overlong penalty needs a buffer > 0 tokens")
        self._check_partial()

    def _check_partial(self) -> None:
        if not self.over_sample >= 0:
            raise ValueError(f"RolloutConfig.over_sample: must be >= 0, got {self.over_sample!r}")
        if self.over_sample and not self.partial:
            raise ValueError("RolloutConfig.over_sample: extra groups need partial rollout (--rollout.partial true)")
        if self.partial and self.dynamic_sampling:
            raise ValueError("RolloutConfig.partial: not with dynamic_sampling (use over_sample for extra groups)")
        if self.partial and self.generate_fn:
            raise ValueError(
                "RolloutConfig.partial: not with a custom generate_fn (a continued sample is a single-turn request)"
            )


@dataclass(slots=True)
class GenerateContext:
    """What a generate function gets besides the sample."""

    client: EngineClient
    params: SamplingParams
    """Sampling parameters of one response (n = 1; the sample's own seed is set per call)."""
    tokenizer: Any
    config: RolloutConfig


GenerateFn = Callable[[GenerateContext, Sample], Awaitable[Sample]]


async def single_turn(ctx: GenerateContext, sample: Sample) -> Sample:
    """The default generate function: one response to the prompt."""
    params = replace(ctx.params, seed=sample.metadata.get("seed"))
    out = (await ctx.client.generate(sample.prompt_ids, params))[0]
    sample.response_ids = list(out.token_ids)
    sample.rollout_logprobs = list(out.logprobs)
    sample.routed_experts = out.routed_experts
    sample.weight_version = out.weight_version
    sample.status = SampleStatus.TRUNCATED if out.finish_reason == FinishReason.LENGTH else SampleStatus.COMPLETED
    if out.finish_reason == FinishReason.ABORT:
        sample.status = SampleStatus.ABORTED
    sample.metadata["response_text"] = out.text
    return sample


def load_generate_fn(spec: str) -> GenerateFn:
    """The generate function named by `spec` ('module:function'), or the single-turn default."""
    if not spec:
        return single_turn
    fn = load_named(spec, "rollout.generate_fn", "module:function")
    if not asyncio.iscoroutinefunction(fn):
        raise ValueError(f"RolloutConfig.generate_fn: {spec!r} must be an `async def generate(ctx, sample)`")
    return fn


def sample_seed(run_seed: int, step: int, group: int, k: int) -> int:
    return (run_seed * 1_000_003 + step * 100_003 + group * 1_009 + k) % 2**31


def make_samples(prompts: list[Prompt], first_group: int, step: int, cfg: RolloutConfig, seed: int) -> list[Sample]:
    """K samples per prompt, with consecutive group ids from `first_group`."""
    samples = []
    for g, prompt in enumerate(prompts):
        for k in range(cfg.n_samples_per_prompt):
            meta = {"prompt_text": prompt.text, "label": prompt.label, "prompt_index": prompt.index}
            meta |= prompt.metadata | {"seed": sample_seed(seed, step, first_group + g, k)}
            samples.append(Sample(prompt_ids=list(prompt.prompt_ids), group_id=first_group + g, metadata=meta))
    return samples


@dataclass(slots=True)
class RolloutResult:
    samples: list[Sample]
    """Kept samples, group by group (failed ones included, with status FAILED)."""
    metrics: dict[str, float]
    generated_tokens: int = 0
    generate_s: float = 0.0


Sections = Callable[[str], AbstractContextManager]


class CarriedRollout(Protocol):
    """A step's rollout with samples carried between steps (`leagues.rollout.partial.PartialRollout`, which
    builds on this module)."""

    async def rollout(self, next_prompts, num_groups, step, ctx, scorer, seed, sections) -> "RolloutResult": ...


async def rollout(
    next_prompts: Callable[[int], list[Prompt]],
    num_groups: int,
    step: int,
    ctx: GenerateContext,
    scorer: RewardScorer,
    generate_fn: GenerateFn = single_turn,
    seed: int = 0,
    sections: Sections | None = None,
    partial: CarriedRollout | None = None,
) -> RolloutResult:
    """Generate and score `num_groups` prompt groups (more rounds with dynamic sampling). With
    `RolloutConfig.partial`, `partial` holds the samples carried between steps (`leagues.rollout.partial`)."""
    cfg, sections = ctx.config, sections or (lambda name: nullcontext())
    retried = getattr(ctx.client, "num_retried", 0)
    if cfg.partial:
        if partial is None:
            raise ValueError("RolloutConfig.partial: pass the carried samples' state (rollout(..., partial=...))")
        result = await partial.rollout(next_prompts, num_groups, step, ctx, scorer, seed, sections)
        result.metrics["rollout/retried"] = float(getattr(ctx.client, "num_retried", 0) - retried)
        return result
    kept: list[list[Sample]] = []
    seen: list[Sample] = []
    result = RolloutResult(samples=[], metrics={})
    rounds = 0
    while len(kept) < num_groups and rounds < cfg.max_rounds:
        prompts = next_prompts(num_groups - len(kept) if cfg.dynamic_sampling else num_groups)
        samples = make_samples(prompts, len(seen) // cfg.n_samples_per_prompt, step, cfg, seed)
        with sections("generate"):
            start = time.perf_counter()
            await asyncio.gather(*(_generate_one(generate_fn, ctx, s) for s in samples))
            result.generate_s += time.perf_counter() - start
        with sections("reward"):
            (await scorer.score(samples)).raise_if_none_scored(scorer.cfg.name)
        shape_overlong(samples, cfg)
        seen += samples
        groups = _groups(samples)
        kept += [g for g in groups if not cfg.dynamic_sampling or _varies(g)]
        rounds += 1
        if not cfg.dynamic_sampling:
            break
    result.samples = [s for group in kept[: max(num_groups, 0)] for s in group]
    result.generated_tokens = sum(len(s.response_ids) for s in seen)
    result.metrics = rollout_metrics(seen, result, cfg, rounds)
    result.metrics["rollout/retried"] = float(getattr(ctx.client, "num_retried", 0) - retried)  # engine requests
    return result


async def _generate_one(fn: GenerateFn, ctx: GenerateContext, sample: Sample) -> Sample:
    try:
        out = await fn(ctx, sample)
    except Exception as e:  # one failed generation costs its sample, not the run
        sample.status = SampleStatus.FAILED
        sample.metadata["error"] = f"generate: {type(e).__name__}: {e}"
        sample.metadata.setdefault("response_text", "")
        return sample
    if out is not sample:
        raise TypeError("a generate function must fill in and return the sample it was given")
    return sample


def _groups(samples: list[Sample]) -> list[list[Sample]]:
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group_id, []).append(s)
    return list(groups.values())


def _varies(group: list[Sample]) -> bool:
    rewards = [s.reward for s in group if s.status != SampleStatus.FAILED]
    return len(rewards) > 1 and max(rewards) > min(rewards)


def shape_overlong(samples: list[Sample], cfg: RolloutConfig) -> None:
    for s in samples:
        if s.status == SampleStatus.TRUNCATED and cfg.overlong == "filter":
            s.loss_mask = [0] * len(s.response_ids)
        elif cfg.overlong == "penalty" and s.status != SampleStatus.FAILED:
            over = len(s.response_ids) - (cfg.max_response_len - cfg.overlong_buffer)
            if over > 0:
                s.reward -= cfg.overlong_penalty * min(over / cfg.overlong_buffer, 1.0)


def rollout_metrics(seen: list[Sample], result: RolloutResult, cfg: RolloutConfig, rounds: int) -> dict[str, float]:
    """Per-step rollout metrics over every generated sample (`rollout/...`)."""
    ok = [s for s in seen if s.status != SampleStatus.FAILED]
    rewards = [s.reward for s in ok] or [math.nan]
    lengths = [len(s.response_ids) for s in ok] or [0]
    metrics = {
        "rollout/reward_mean": statistics.fmean(rewards),
        "rollout/reward_std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
        "rollout/pass_rate": sum(r >= cfg.pass_threshold for r in rewards) / max(len(ok), 1),
        "rollout/prompt_len_mean": statistics.fmean(len(s.prompt_ids) for s in ok) if ok else 0.0,
        "rollout/response_len_mean": statistics.fmean(lengths),
        "rollout/response_len_max": float(max(lengths)),
        "rollout/truncated_frac": sum(s.status == SampleStatus.TRUNCATED for s in ok) / max(len(ok), 1),
        "rollout/failed": float(len(seen) - len(ok)),
        "rollout/num_samples": float(len(result.samples)),
        "rollout/num_generated": float(len(seen)),
        "rollout/tokens_per_s": result.generated_tokens / result.generate_s if result.generate_s else 0.0,
    }
    if cfg.dynamic_sampling:
        metrics["rollout/rounds"] = float(rounds)
        metrics["rollout/kept_groups"] = float(len(_groups(result.samples)))
    return metrics | agent_metrics(ok)


def agent_metrics(samples: list[Sample]) -> dict[str, float]:
    """Multi-turn samples (their ledger's `num_turns` and `termination` in the metadata): the mean and largest
    number of turns, and the fraction of samples ending for each reason (`rollout/agent/...`); {} for none."""
    agent = [s for s in samples if "num_turns" in s.metadata]
    if not agent:
        return {}
    turns = [s.metadata["num_turns"] for s in agent]
    metrics = {"rollout/agent/turns_mean": statistics.fmean(turns), "rollout/agent/turns_max": float(max(turns))}
    for reason in sorted({s.metadata["termination"] for s in agent}):
        share = sum(s.metadata["termination"] == reason for s in agent) / len(agent)
        metrics[f"rollout/agent/termination/{reason}"] = share
    return metrics
