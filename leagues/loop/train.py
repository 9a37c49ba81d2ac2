"""The RL loop, readable top to bottom: `train_colocated(cfg)`, the default placement. Disaggregated placement
is in `disaggregated.py` with the same stages; `leagues.loop.train(cfg)` picks one by `cfg.placement`.

        ┌──────────── every rank, every step ─────────────────────────────────────────────────┐
        │ prompts[rank::world] ─► rollout ─► rewards ─► advantages ─► engine.sleep()          │
        │   (PromptIterator)      (engine,    (scorer)   (global batch; (frees the KV cache)  │
        │                          n per prompt)          gae: critic)                        │
        │                                                       │                             │
        │ engine.wake() ◄─ weights (in place, version) ◄─ trainer.train_step(global batch) ◄─┘  │
        │      │               push_in_place                (rebalanced by tokens, FSDP2+EP)    │
        └──────┼───────────────────────────────────────────────────────────────────────────────┘
               └─► metrics (sinks) ─► held-out eval every k steps ─► checkpoint every k steps

Each stage's time goes to `time/<stage>` (rollout, reward, train, sync, eval, save, idle), every metric to
the sinks (JSONL, TensorBoard, console, Prometheus) under `rollout/`, `train/`, `eval/`, `time/`.

Decisions:
- A prompt's group stays on the rank that generated it: advantages need no communication; the trainer then
  rebalances the whole batch across ranks by token count.
- Samples whose generation or reward failed are counted (`rollout/failed`) and left out of training.
- Held-out accuracy is greedy (temperature 0) on the held-out prompts, split over the ranks.
- PPO with a critic (`advantage.estimator gae`): the trainer's critic values every response token of the batch
  once (`time/values`), GAE turns rewards and values into per-token advantages and returns, and the train step
  updates the critic beside the policy (`train/critic/*`).
- On-policy distillation (`distill.teacher`): the teacher scores the batch's sampled tokens once (`time/teacher`),
  after advantages, and each token's advantage gets -`distill.coef` x its reverse KL estimate
  (`leagues.train.distill`); `advantage.estimator distill` leaves the teacher as the only signal.
"""

import asyncio
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from leagues.loop.config import TrainConfig
from leagues.loop.run import Run, log
from leagues.rollout import Prompt
from leagues.rollout.generate import rollout
from leagues.train import AdvantageInputs, compute_advantages
from leagues.train.distill import add_distill_advantages
from leagues.train.packing import response_mask
from leagues.types import Sample, SampleStatus, SamplingParams


def train_colocated(cfg: TrainConfig) -> list[dict[str, float]]:
    """Run the whole job with every rank rolling out and training; returns the per-step metrics."""
    run = Run.build(cfg)
    history = []
    try:
        if run.start_step or run.engine is None:  # resumed, or external engines: start from our weights
            sync_weights(run, run.start_step)
        if run.start_step == 0 and cfg.eval.every and run.held_out is not None:  # the starting point, as step 0
            start = evaluate(run)
            log(f"step 0: held-out accuracy {start['eval/accuracy']:.3f}")
            run.sinks.log(0, start)
        for step in range(run.start_step, cfg.steps):
            metrics = colocated_step(run, step)
            metrics |= maybe_eval(run, step)
            metrics |= maybe_save(run, step)
            metrics |= run.timer.pop()
            run.sinks.log(step + 1, metrics)
            history.append(metrics)
    finally:
        run.close()
    finish(run)
    return history


def colocated_step(run: Run, step: int) -> dict[str, float]:
    cfg, timer = run.cfg, run.timer
    result = run.loop.run_until_complete(
        rollout(
            next_prompts=lambda n: rank_prompts(run, n),
            num_groups=len(range(run.rank, cfg.rollout.batch_size, run.world)),
            step=step,
            ctx=run.ctx,
            scorer=run.scorer,
            generate_fn=run.generate_fn,
            seed=cfg.seed,
            sections=lambda name: timer.section("rollout" if name == "generate" else name),
            partial=run.partial,
        )
    )
    run.wait_for_peers()
    report_failures(result.samples, step, run.rank)
    samples = trainable(result.samples)
    sleep = run.engine_sleeps
    if sleep:
        with timer.section("sleep"):  # releases the KV cache's pages for training; wake maps them back
            run.engine.sleep(offload_weights=cfg.engine_offload_weights)
    train_metrics = learn(run, samples)
    if sleep:
        with timer.section("sleep"):
            run.engine.wake()
    with timer.section("sync"):
        sync_metrics = sync_weights(run, version=step + 1)
    return merge_rollout_metrics(result.metrics) | train_metrics | sync_metrics


def learn(run: Run, samples: list[Sample]) -> dict[str, float]:
    """The trainer's part of a step in either placement, on every trainer rank with its share of the batch (whole
    groups): KL reward shaping (`advantage.kl_in_reward`), the critic's values (gae), advantages (over every
    trainer rank's samples), the distillation term (`distill.teacher`), then the timed train step; its metrics
    under `train/`."""
    shaping = shape_rewards_by_kl(run.trainer, samples, run.cfg)
    if run.cfg.advantage.needs_critic:
        with run.timer.section("values"):  # every trainer rank together: the critic's forward is collective
            for sample, values in zip(samples, run.trainer.compute_values(samples), strict=True):
                sample.values = values.tolist()
    assign_advantages(samples, run.cfg, group=run.trainer.group)
    shaping |= distill_from_teacher(run, samples)
    start = time.perf_counter()
    with run.timer.section("train"):
        metrics = run.trainer.train_step(samples)
    metrics["tokens_per_s"] = metrics.get("tokens", 0.0) / (time.perf_counter() - start)
    return {f"train/{k}": v for k, v in (metrics | shaping).items()}


def distill_from_teacher(run: Run, samples: list[Sample]) -> dict[str, float]:
    """On-policy distillation (`distill.teacher`): the teacher scores this rank's samples (every trainer rank
    together: its forward is collective) and each sampled token's advantage gets -`distill.coef` x its reverse KL
    estimate; `distill/reverse_kl` is the estimate's token mean over every trainer rank's loss tokens."""
    cfg, trainer = run.cfg.distill, run.trainer
    if not cfg.enabled:
        return {}
    with run.timer.section("teacher"):
        teacher = trainer.teacher_logprobs(samples)
    sums = torch.tensor(add_distill_advantages(samples, teacher, cfg.coef), dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(trainer.group) > 1:
        sums = sums.to(trainer.device)
        dist.all_reduce(sums, group=trainer.group)
    return {"distill/reverse_kl": float(sums[0]) / max(float(sums[1]), 1.0)}


def rank_prompts(run: Run, num: int) -> list[Prompt]:
    """This rank's `num` prompts of the step. With partial rollout ranks carry different numbers of groups, so
    they ask for different numbers (0 included): they agree on the counts, draw one batch and each takes its own
    slice, so the data position stays one number for the whole job (and resumes exactly)."""
    if not run.cfg.rollout.partial:
        return run.prompts.next_batch(num * run.world)[run.rank :: run.world]
    counts = [num]
    if dist.is_initialized() and run.world > 1:
        counts = [None] * run.world
        dist.all_gather_object(counts, num)
    batch = run.prompts.next_batch(sum(counts)) if sum(counts) else []
    start = sum(counts[: run.rank])
    return batch[start : start + num]


def sync_weights(run: Run, version: int) -> dict[str, float]:
    """The trainer's new weights into the engines, by the run's transport (`Run.weight_sync`)."""
    return run.weight_sync.push(run.trainer, version) | {"sync/weight_version": float(version)}


def report_failures(samples: list[Sample], step: int, rank: int) -> None:
    """Say on the console when samples failed (a reward that raised or timed out, a generation error), with the
    first error: the run goes on, but a reward that fails every time should not look like a reward of 0."""
    failed = [s for s in samples if s.status == SampleStatus.FAILED]
    if failed:
        first = failed[0].metadata.get("error", "no message")
        print(
            f"step {step + 1}: {len(failed)} of {len(samples)} samples failed on rank {rank}; first: {first}",
            flush=True,
        )


def trainable(samples: list[Sample]) -> list[Sample]:
    """Samples the trainer may learn from: not failed, not aborted (cut off by the engine, not the policy's
    own ending: its advantage would score an answer it never finished), with a response."""
    return [s for s in samples if s.status not in (SampleStatus.FAILED, SampleStatus.ABORTED) and s.response_ids]


def shape_rewards_by_kl(trainer, samples: list[Sample], cfg: TrainConfig) -> dict[str, float]:
    """`advantage.kl_in_reward`: every sample's reward gets its KL penalty (`Trainer.kl_rewards`) before
    advantages; returns the mean penalty over this rank's samples (every trainer rank calls it together)."""
    if not cfg.advantage.kl_in_reward:
        return {}
    penalties = trainer.kl_rewards(samples)
    for sample, penalty in zip(samples, penalties, strict=True):
        sample.reward += penalty
    return {"kl/reward_penalty_mean": sum(penalties) / max(len(penalties), 1)}


def assign_advantages(samples: list[Sample], cfg: TrainConfig, group: dist.ProcessGroup | None = None) -> None:
    """Advantages over the global batch: the rewards (and values and loss masks, for gae) of every rank of `group`
    (the trainer's ranks; None, as in torch: every rank of the job) are gathered (groups numbered per rank, so
    they stay apart), so batch statistics (REINFORCE++ and gae whitening) are the global batch's, not each
    rank's; every rank of `group` calls it then. gae sets each sample's `token_advantages` and `returns`, the
    others its `advantage`."""
    token_level = cfg.advantage.needs_critic
    rows = [(s.reward, s.group_id, *((s.values, response_mask(s)) if token_level else ())) for s in samples]
    rank, parts = 0, [rows]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        rank, parts = dist.get_rank(group), [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, rows, group=group)
    if not samples:
        return
    everything = [row for part in parts for row in part]
    groups = torch.tensor([(i, row[1]) for i, part in enumerate(parts) for row in part])
    inputs = AdvantageInputs(
        rewards_N=torch.tensor([row[0] for row in everything], dtype=torch.float32),
        group_ids_N=groups.unique(dim=0, return_inverse=True)[1],
    )
    if token_level:
        inputs.values_NR = padded([row[2] for row in everything])
        inputs.mask_NR = padded([row[3] for row in everything])
    start = sum(len(part) for part in parts[:rank])
    advantages, returns = compute_advantages(inputs, cfg.advantage)
    for i, sample in enumerate(samples, start=start):
        if not token_level:
            sample.advantage = float(advantages[i])
            continue
        length = len(sample.response_ids)
        sample.token_advantages, sample.returns = advantages[i, :length].tolist(), returns[i, :length].tolist()


def padded(rows: list[list[float]]) -> torch.Tensor:
    """[N, R] float32: the rows, zero-padded to the longest."""
    out = torch.zeros(len(rows), max((len(r) for r in rows), default=0))
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def merge_rollout_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Each rank's rollout metrics combined over ranks: sums, maxima, and means weighted by sample count."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    parts: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(parts, metrics)
    return merge_parts(parts)


def merge_parts(parts: list[dict[str, float]]) -> dict[str, float]:
    """Rollout metrics of several ranks as one: sums, maxima, and means weighted by generated samples."""
    weights = [p.get("rollout/num_generated", 1.0) for p in parts]
    total = max(sum(weights), 1.0)
    merged = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if key.endswith("_max"):
            merged[key] = max(values)
        elif key in SUMMED:
            merged[key] = sum(values)
        else:
            merged[key] = sum(v * w for v, w in zip(values, weights, strict=True)) / total
    return merged


SUMMED = {
    "rollout/carried",
    "rollout/aborted",
    "rollout/new_groups",
    "rollout/dropped_groups",
    "rollout/failed",
    "rollout/retried",
    "rollout/num_samples",
    "rollout/num_generated",
    "rollout/tokens_per_s",
    "rollout/kept_groups",
}


def evaluate(run: Run, alone: bool = False) -> dict[str, float]:
    """Greedy held-out accuracy (and mean response length) over every rank's share of the held-out prompts;
    `alone`: this rank evaluates them all, with no collective (the evaluating engine rank of a disaggregated run)."""
    rank, world = (0, 1) if alone else (run.rank, run.world)
    prompts = [p for i, p in enumerate(run.held_out) if i % world == rank]
    params = SamplingParams(
        temperature=0.0, max_new_tokens=run.cfg.eval.max_response_len or run.ctx.params.max_new_tokens
    )
    samples = [Sample(prompt_ids=list(p.prompt_ids), group_id=i) for i, p in enumerate(prompts)]
    for s, p in zip(samples, prompts, strict=True):
        s.metadata = {"prompt_text": p.text, "label": p.label} | p.metadata

    ctx = replace(run.ctx, params=params)  # the run's generate function (multi-turn episodes too), greedy

    async def all_of_them() -> None:
        await asyncio.gather(*(run.generate_fn(ctx, s) for s in samples))
        await run.scorer.score(samples)

    run.loop.run_until_complete(all_of_them())
    if not alone:
        run.wait_for_peers()
    threshold = run.cfg.rollout.pass_threshold
    totals = torch.tensor(
        [sum(s.reward >= threshold for s in samples), len(samples), sum(len(s.response_ids) for s in samples)],
        dtype=torch.float64,
    )
    if dist.is_initialized() and not alone:  # NCCL reduces on the GPU only
        totals = totals.to("cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(totals)
    correct, count, length = totals.tolist()
    return {"eval/accuracy": correct / max(count, 1.0), "eval/response_len_mean": length / max(count, 1.0)}


def eval_due(run: Run, version: int) -> bool:
    """Whether held-out accuracy is measured with the weights after `version` steps (0: the starting point)."""
    every = run.cfg.eval.every
    if not every or run.held_out is None:
        return False
    return version % every == 0 or version == run.cfg.steps


def maybe_eval(run: Run, step: int) -> dict[str, float]:
    if not eval_due(run, step + 1):
        return {}
    with run.timer.section("eval"):
        out = evaluate(run)
    log(f"step {step + 1}: held-out accuracy {out['eval/accuracy']:.3f}")
    return out


def maybe_save(run: Run, step: int) -> dict[str, float]:
    every = run.cfg.checkpoint.every
    if not run.cfg.checkpoint.enabled:
        return {}
    if (every and (step + 1) % every == 0) or step + 1 == run.cfg.steps:
        with run.timer.section("save"):
            run.save(step + 1)
    return {}


def finish(run: Run) -> None:
    if run.rank == 0 and run.cfg.report and (run.run_dir / "metrics.jsonl").is_file():
        from leagues.obs.report import write_report

        paths = write_report(run.run_dir)
        log(f"report: {paths[-1]}")
