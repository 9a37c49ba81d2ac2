"""Partial rollout and over-sampling (miles' `--partial-rollout`, slime's over-sampling): a step's rollout
stops as soon as its batch of groups is complete, aborts the requests still running, and carries their
samples into the next step, where they continue under the new weights.

    step s:  carried samples ──► continue (prompt + response so far, the budget left) ─┐
             new groups (ceil(groups x (1 + over_sample)) - carried groups) ──► start ──┤
                                                                                        ▼
             the first `num_groups` groups whose samples all finished ──► rewards ──► the step's batch
             every other group ──► abort its requests (tokens so far come back) ──► carried into step s+1

Where it sits: `rollout(..., partial=PartialRollout())` (`leagues.rollout.generate`) hands its step to
`PartialRollout.rollout` when `RolloutConfig.partial` is on; the caller owns the state (the RL loop keeps one
on its `Run` and saves it with each checkpoint, so a resumed run continues the same samples).

Decisions:
- Whole groups are carried: an unfinished sample's finished siblings wait with it, since the group's
  advantage needs all of them. Groups complete in the order they finish. Groups that complete after the
  batch is full (in the same engine step, or while the aborts are on their way) are carried too and come
  first next step; with `partial_mask_old` such a group has nothing left to train on by then (every token
  is older than the new weights) and is dropped instead, its slot going to a new group.
- A continuation is one engine request: prompt ids + response so far, `max_new_tokens` the rest of
  `max_response_len`. Its tokens, logprobs and weight versions are appended to the sample's; routes are
  joined so that the tokens computed before keep the experts recorded then.
- A continuation's seed is derived from the sample's own seed and its length: the engine's noise counter
  restarts at 0 with each request, so the same seed would replay the noise of the response's first tokens.
  A sample aborted before its first token starts again with exactly its own seed.
- Each response token keeps the weights version that sampled it (`Sample.token_versions`). With
  `partial_mask_old`, tokens older than the version the engines serve at the step's start (the version
  the trainer trains this step, colocated) get loss mask 0.
- The response text is the concatenation of each request's text (a stop string that spans two requests is
  not seen; the stop token ids and eos are).
- Where a request is aborted depends on timing, so runs are not bitwise repeatable: deterministic mode
  refuses partial rollout.
"""

import asyncio
import itertools
import math
import secrets
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace

import torch

from leagues.rollout.data import Prompt
from leagues.rollout.generate import (
    GenerateContext,
    RolloutResult,
    Sections,
    make_samples,
    rollout_metrics,
    shape_overlong,
)
from leagues.rollout.rewards import RewardScorer
from leagues.types import FinishReason, Sample, SampleStatus

FINISHED = (SampleStatus.COMPLETED, SampleStatus.TRUNCATED, SampleStatus.FAILED)


def continuation_seed(seed: int | None, num_tokens: int) -> int | None:
    """The seed of the request that continues a sample after `num_tokens` response tokens."""
    return None if seed is None else (seed + num_tokens * 0x9E3779B1) % 2**31


def join_routes(old: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
    """Routes [tokens - 1, L, K] of a continued sample: the rows recorded before, then the continuation's
    rows for the tokens computed after them (the continuation recomputed the earlier ones too)."""
    if old is None or new is None:
        return new if old is None else old
    assert old.shape[0] <= new.shape[0], "a continuation computes every token its first request did"
    return torch.cat([old, new[old.shape[0] :]])


def extend(sample: Sample, out) -> None:
    """Append one request's output (an engine `Output`, as an `EngineClient` returns it) to the sample it
    continued."""
    new = list(out.token_ids)
    sample.response_ids = sample.response_ids + new
    sample.rollout_logprobs = (sample.rollout_logprobs or []) + list(out.logprobs)
    sample.token_versions = (sample.token_versions or []) + [out.weight_version] * len(new)
    sample.weight_version = min(sample.token_versions, default=out.weight_version)
    sample.routed_experts = join_routes(sample.routed_experts, out.routed_experts)
    sample.metadata["response_text"] = sample.metadata.get("response_text", "") + out.text
    statuses = {FinishReason.ABORT: SampleStatus.ABORTED, FinishReason.LENGTH: SampleStatus.TRUNCATED}
    sample.status = statuses.get(out.finish_reason, SampleStatus.COMPLETED)


def mask_stale(samples: list[Sample], version: int) -> None:
    """Loss mask 0 on the response tokens sampled under weights older than `version`."""
    for s in samples:
        if s.token_versions and min(s.token_versions) < version:
            mask = s.loss_mask if s.loss_mask is not None else [1] * len(s.response_ids)
            s.loss_mask = [m if v >= version else 0 for m, v in zip(mask, s.token_versions, strict=True)]


def is_spent(group: list[Sample], version: int) -> bool:
    """Whether a carried group is complete with every token older than `version`: with `partial_mask_old` it
    has nothing left to train on (it finished after the batch was full, while the aborts were on their way)."""
    finished = all(s.status in FINISHED for s in group)
    return finished and not any(v >= version for s in group for v in s.token_versions or [])


def groups_of(samples: list[Sample]) -> dict[int, list[Sample]]:
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group_id, []).append(s)
    return groups


@dataclass(slots=True)
class StepStats:
    tokens: int = 0
    """Tokens the engine generated this step (aborted requests' included)."""
    aborted: int = 0
    """Requests this step aborted."""
    dropped_groups: int = 0
    """Carried groups dropped at the step's start: complete, and every token masked as older."""


class PartialRollout:
    """The samples carried from one step's rollout into the next, and the rollout that continues them."""

    def __init__(self) -> None:
        self.carried: list[Sample] = []
        """Whole groups: unfinished samples (status ABORTED or PENDING) with their finished siblings."""
        self.version = 0
        """The newest weights version the engines have reported (the step's, colocated)."""
        self._prefix = f"partial-{secrets.token_hex(4)}"  # request ids unique among callers of one engine
        self._ids = itertools.count()

    async def rollout(
        self,
        next_prompts: Callable[[int], list[Prompt]],
        num_groups: int,
        step: int,
        ctx: GenerateContext,
        scorer: RewardScorer,
        seed: int = 0,
        sections: Sections | None = None,
    ) -> RolloutResult:
        """The step's `num_groups` complete groups, scored; the rest is carried. `next_prompts(n)` is called
        once, with n = 0 too (ranks that carry different numbers of groups agree on the data drawn)."""
        cfg, sections = ctx.config, sections or (lambda name: nullcontext())
        version = await ctx.client.weight_version()  # the step's weights (no request may run this step)
        self.version = max(self.version, version if version is not None else 0)
        carried, self.carried = self.carried, []
        groups = groups_of(carried)
        spent = [g for g, members in groups.items() if cfg.partial_mask_old and is_spent(members, self.version)]
        carried = [s for g, members in groups.items() if g not in spent for s in members]
        num_new = max(math.ceil(num_groups * (1 + cfg.over_sample)) - len(groups) + len(spent), 0)
        first_group = max(groups, default=-1) + 1
        samples = carried + make_samples(next_prompts(num_new), first_group, step, cfg, seed)
        result, stats = RolloutResult(samples=[], metrics={}), StepStats(dropped_groups=len(spent))
        with sections("generate"):
            start = time.perf_counter()
            result.samples = await self._generate(ctx, samples, num_groups, stats)
            result.generate_s = time.perf_counter() - start
        with sections("reward"):
            (await scorer.score(result.samples)).raise_if_none_scored(scorer.cfg.name)
        shape_overlong(result.samples, cfg)
        if cfg.partial_mask_old:
            mask_stale(result.samples, self.version)
        result.generated_tokens = stats.tokens
        result.metrics = rollout_metrics(result.samples, result, cfg, rounds=1) | self.metrics(result, stats, num_new)
        return result

    async def _generate(self, ctx: GenerateContext, samples: list[Sample], num_groups: int, stats: StepStats):
        """Run every unfinished sample until `num_groups` groups are complete, abort the rest; returns those
        groups' samples and keeps the others in `carried`."""
        groups = groups_of(samples)
        left = {g: sum(s.status not in FINISHED for s in members) for g, members in groups.items()}
        done = [g for g, n in left.items() if n == 0]
        running: dict[asyncio.Future, str] = {}
        if len(done) < num_groups:
            for s in samples:
                if s.status not in FINISHED:
                    rid = f"{self._prefix}-{next(self._ids)}"
                    running[asyncio.ensure_future(self._continue(ctx, s, rid, stats))] = rid
        pending = set(running)
        while pending and len(done) < num_groups:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            done += _completed(finished, left)
        if pending:
            await asyncio.gather(*(ctx.client.abort(running[task]) for task in pending))
            await asyncio.wait(pending)
            done += _completed(pending, left)  # finished before its abort arrived: complete, carried
        keep = done[:num_groups]
        self.carried = [s for g, members in groups.items() if g not in keep for s in members]
        return [s for g in keep for s in groups[g]]

    async def _continue(self, ctx: GenerateContext, sample: Sample, request_id: str, stats: StepStats) -> Sample:
        """One request that starts or continues `sample`."""
        num_done = len(sample.response_ids)
        params = replace(
            ctx.params,
            seed=continuation_seed(sample.metadata.get("seed"), num_done),
            max_new_tokens=max(ctx.config.max_response_len - num_done, 0),
        )
        try:
            out = (await ctx.client.generate(sample.prompt_ids + sample.response_ids, params, request_id))[0]
        except Exception as e:  # one failed generation costs its sample, not the run
            sample.status = SampleStatus.FAILED
            sample.metadata["error"] = f"generate: {type(e).__name__}: {e}"
            sample.metadata.setdefault("response_text", "")
            return sample
        extend(sample, out)
        self.version = max(self.version, out.weight_version)
        stats.tokens += len(out.token_ids)
        stats.aborted += out.finish_reason == FinishReason.ABORT
        return sample

    def metrics(self, result: RolloutResult, stats: StepStats, num_new: int) -> dict[str, float]:
        """`rollout/carried` (samples carried into the next step), `rollout/aborted` (requests aborted),
        `rollout/new_groups` (groups drawn from the data), `rollout/dropped_groups` (`is_spent`), and the age
        of the batch's tokens sampled under older weights, in versions behind the step's (steps, colocated):
        `carried_age_max`, `carried_age_mean` (over those tokens; 0 when none) and `stale_token_frac` (their
        share of the batch's tokens)."""
        ages = [self.version - v for s in result.samples for v in s.token_versions or []]
        old = [a for a in ages if a > 0]
        return {
            "rollout/carried": float(len(self.carried)),
            "rollout/aborted": float(stats.aborted),
            "rollout/new_groups": float(num_new),
            "rollout/dropped_groups": float(stats.dropped_groups),
            "rollout/carried_age_max": float(max(old, default=0)),
            "rollout/carried_age_mean": statistics.fmean(old) if old else 0.0,
            "rollout/stale_token_frac": len(old) / max(len(ages), 1),
        }

    def state_dict(self) -> dict:
        """The carried samples as plain data (a checkpoint's `extra`)."""
        rows = [{f.name: getattr(s, f.name) for f in fields(Sample)} | {"status": s.status.value} for s in self.carried]
        return {"samples": rows, "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        self.carried = [Sample(**(row | {"status": SampleStatus(row["status"])})) for row in state["samples"]]
        self.version = int(state["version"])


def _completed(tasks, left: dict[int, int]) -> list[int]:
    """Groups whose last unfinished sample is among the finished `tasks`."""
    groups = []
    for task in tasks:
        sample = task.result()
        if sample.status in FINISHED:
            left[sample.group_id] -= 1
            if left[sample.group_id] == 0:
                groups.append(sample.group_id)
    return groups
