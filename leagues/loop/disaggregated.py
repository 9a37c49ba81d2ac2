"""Disaggregated placement: engine ranks keep generating while the trainer ranks train, within a staleness bound.

    engine ranks (the last `num_engine_ranks`)        trainer ranks (the first world - num_engine_ranks)
    ──────────────────────────────────────────        ──────────────────────────────────────────────────────
    step s: wait for weights of version >= s - k ◄─┐  rank 0: recv batch s from every engine rank
            rollout + rewards of its prompt share  │          merge, cut into shares of whole groups ─► ranks
            isend batch s (samples, metrics) ──────┼─► all:   advantages, train_step (FSDP2 over the trainer
                                                   │          ranks alone)                      (time/train)
                                                   └─ rank 0: broadcast weights, version s+1    (time/sync)
                                                      (every trainer rank gathers; bucketed: header + one flat
                                                       tensor per dtype)

With k = `max_staleness` = 1, batch s+1 is generated with the weights of step s-1 while step s trains: the
two overlap, and the trainer's off-policy correction (`trainer.loss.off_policy`, e.g. token_tis) handles
the lag; every sample carries the weight version it was generated with (`train/staleness` is logged).

Decisions:
- The split is `num_engine_ranks` (the last ranks generate; the others train), checked against the job's size
  before any model is built (`num_trainer_ranks`), by the launcher too.
- The trainer ranks have a mesh of their own (`leagues.parallel.build_mesh(..., ranks=...)`, made by every rank
  of the job): FSDP2, expert parallel, batch balancing, metrics and checkpoints run over them alone. One trainer
  rank is the same code on a mesh of one.
- Batches travel as pickled samples over a gloo group with non-blocking sends, so an engine never waits
  for the trainer to take a batch (a blocking send would deadlock against the weight broadcast). They all go to
  trainer rank 0, which deals them out: shares of whole groups with about equal tokens (`split_groups`), so
  KL shaping is spread over the trainer ranks and advantages are those of each true group. The shares keep the
  batch's order, so the global batch the trainer gathers (and so each mini-batch) does not depend on the number
  of trainer ranks; the train step then rebalances it by tokens, as in colocated runs.
- Weights travel in one broadcast group (trainer rank 0 + engines; NCCL on GPUs, gloo on CPUs): the run's
  `broadcast` weight sync (`leagues.sync.WEIGHT_SYNCS`). The trainers' part of a step is the colocated loop's
  (`learn`).
- Every engine draws the same global batch of prompts and keeps its share, and sends its prompt position
  with each batch; every trainer rank checkpoints the position of the last batch it trained on, so a resumed run
  regenerates exactly the batches that were not trained on.
- Each engine numbers its prompt groups from 0; trainer rank 0 renumbers them per engine (`merge_batches`), so
  groups of different engines never merge in the advantages.
- Held-out evaluation (`eval.every`) runs on the first engine rank, alone, with the weights of each evaluated
  version as they arrive: it never holds the trainers up. Its results travel with that engine's next batch (and
  a last message after the final weights); trainer rank 0 logs each under the step of the weights it measured,
  after that step's own row (`leagues report` merges the rows of a step).
"""

import pickle

import torch
import torch.distributed as dist

from leagues.loop.config import TrainConfig
from leagues.loop.run import Run, log
from leagues.loop.train import eval_due, evaluate, finish, learn, maybe_save, merge_parts, report_failures, trainable
from leagues.rollout.generate import rollout
from leagues.train.packing import input_length
from leagues.types import Sample

LEAD = 0
"""The trainer rank that receives the engines' batches, deals them out, broadcasts the weights and logs."""


def train_disaggregated(cfg: TrainConfig) -> list[dict[str, float]]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    num_trainers = num_trainer_ranks(cfg, world)
    if cfg.engine_urls:
        raise ValueError("placement disaggregated: engine_urls (external engines) use the colocated loop's HTTP path")
    data_group = dist.new_group(backend="gloo")
    run = Run.build(cfg, trainer_ranks=list(range(num_trainers)))  # its weight sync: broadcast
    try:
        if run.rank < num_trainers:
            return trainer_loop(run, data_group, engines=list(range(num_trainers, world)))
        engine_loop(run, data_group)
        return []
    finally:
        run.close()


def num_trainer_ranks(cfg: TrainConfig, world: int) -> int:
    """How many of `world` ranks train: all but the last `num_engine_ranks`. A split that cannot run (no trainer
    rank, no engine rank, `trainer.parallel.ep` not dividing the trainer ranks) raises `ValueError` naming the knobs."""
    engines = cfg.num_engine_ranks
    trainers = world - engines
    if engines < 1 or trainers < 1:
        raise ValueError(
            f"num_engine_ranks: placement disaggregated needs at least one trainer rank and one engine rank; got "
            f"{world} ranks with num_engine_ranks={engines} (launch at least {max(engines, 1) + 1} ranks, "
            "--nproc x --nnodes, or set num_engine_ranks lower)"
        )
    ep = cfg.trainer.parallel.ep
    if trainers % ep:
        raise ValueError(
            f"trainer.parallel.ep: {ep} must divide the {trainers} trainer ranks ({world} ranks less "
            f"num_engine_ranks={engines})"
        )
    return trainers


class Evaluator:
    """Held-out accuracy on the evaluating engine rank, at each version `eval_due` names; results wait in
    `done` until they travel to the trainer."""

    def __init__(self, run: Run, active: bool) -> None:
        self.run, self.active, self.done = run, active, []

    def at(self, version: int) -> None:
        if self.active and eval_due(self.run, version):
            self.done.append((version, evaluate(self.run, alone=True)))

    def take(self) -> list[tuple[int, dict[str, float]]]:
        done, self.done = self.done, []
        return done


def engine_loop(run: Run, data_group) -> None:
    cfg, first = run.cfg, len(run.trainer_ranks)  # engine ranks follow the trainer ranks
    index, num = run.rank - first, run.world - first
    version, pending = run.start_step, []
    evaluator = Evaluator(run, active=index == 0)

    def receive() -> int:
        new = run.weight_sync.receive(run.engine)
        evaluator.at(new)
        return new

    if run.start_step:
        version = run.weight_sync.receive(run.engine)  # the resumed trainer's weights
    else:
        evaluator.at(0)  # the starting point
    for step in range(run.start_step, cfg.steps):
        while version < step - cfg.max_staleness:
            version = receive()
        result = run.loop.run_until_complete(
            rollout(
                next_prompts=lambda n: run.prompts.next_batch(n * num)[index::num],
                num_groups=len(range(index, cfg.rollout.batch_size, num)),
                step=step,
                ctx=run.ctx,
                scorer=run.scorer,
                generate_fn=run.generate_fn,
                seed=cfg.seed,
            )
        )
        message = {"samples": result.samples, "metrics": result.metrics, "data": run.prompts.state_dict()}
        pending.append(send_object(message | {"eval": evaluator.take()}, dst=LEAD, group=data_group))
    while version < cfg.steps:  # take every broadcast the trainer makes, so the collectives match
        version = receive()
    if evaluator.active and cfg.eval.every and run.held_out is not None:  # what the last weights scored
        pending.append(send_object({"eval": evaluator.take()}, dst=LEAD, group=data_group))
    for works, _buffers in pending:
        for work in works:
            work.wait()


def trainer_loop(run: Run, data_group, engines: list[int]) -> list[dict[str, float]]:
    """Every trainer rank trains on its share of each batch and pushes the weights; the lead rank also takes the
    batches from the engines, deals them out, and logs."""
    cfg, timer, history = run.cfg, run.timer, []
    lead = run.rank == LEAD
    if run.start_step:
        run.weight_sync.push(run.trainer, version=run.start_step)
    for step in range(run.start_step, cfg.steps):
        with timer.section("wait_rollout"):
            messages = [recv_object(src=e, group=data_group) for e in engines] if lead else []
            samples, metrics = take_batch(messages, step, run.rank) if lead else ([], {})
            share, data = deal(run, samples, messages[0]["data"] if lead else None)
        metrics |= learn(run, share)
        with timer.section("sync"):
            metrics |= run.weight_sync.push(run.trainer, version=step + 1)
        run.prompts.load_state_dict(data)  # the position after the batch just trained on
        metrics |= maybe_save(run, step) | timer.pop()
        run.sinks.log(step + 1, metrics)
        history.append(metrics)
        if lead:
            log_evals(run, messages[0]["eval"])
    if lead and cfg.eval.every and run.held_out is not None:
        log_evals(run, recv_object(src=engines[0], group=data_group)["eval"])
    log(f"disaggregated: {cfg.steps - run.start_step} steps trained")
    finish(run)
    return history


def take_batch(messages: list[dict], step: int, rank: int) -> tuple[list[Sample], dict[str, float]]:
    """The engines' batches as one (groups kept apart), the samples that can be trained on, and the batch's
    metrics: the engines' rollout metrics merged, and how many steps old the weights that generated it were."""
    everything = merge_batches([m["samples"] for m in messages])
    report_failures(everything, step, rank)
    samples = trainable(everything)
    staleness = [step - s.weight_version for s in samples] or [0]
    metrics = merge_parts([m["metrics"] for m in messages])
    metrics["train/staleness_mean"] = sum(staleness) / len(staleness)
    metrics["train/staleness_max"] = float(max(staleness))
    return samples, metrics


def deal(run: Run, samples: list[Sample], data: dict | None) -> tuple[list[Sample], dict]:
    """This trainer rank's share of the batch (`split_groups`) and the data position, sent by the lead rank, which
    holds both (the others pass nothing)."""
    num = len(run.trainer_ranks)
    parts = [(share, data) for share in split_groups(samples, num)] if run.rank == LEAD else None
    if num == 1:
        return parts[0]
    box = [None]
    dist.scatter_object_list(box, parts, src=LEAD, group=run.trainer.group)
    return box[0]


def split_groups(samples: list[Sample], num_ranks: int) -> list[list[Sample]]:
    """`samples` cut into `num_ranks` runs of whole groups with about equal tokens: a group goes to the rank whose
    equal part of the batch's tokens holds the group's middle token. Groups keep the order of their first samples,
    so the shares one after another are the batch in that order, whatever `num_ranks`."""
    groups: dict[int, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.group_id, []).append(sample)
    total = max(sum(input_length(s) for s in samples), 1)
    shares: list[list[Sample]] = [[] for _ in range(num_ranks)]
    done = 0
    for group in groups.values():
        tokens = sum(input_length(s) for s in group)
        shares[min(int((done + tokens / 2) * num_ranks / total), num_ranks - 1)] += group
        done += tokens
    return shares


def merge_batches(batches: list[list[Sample]]) -> list[Sample]:
    """One engine's samples after another's, their group ids made unique: every engine numbers its groups from 0,
    so engine e of n maps its group g to g x n + e (advantages then see each true group alone)."""
    for index, batch in enumerate(batches):
        for sample in batch:
            sample.group_id = sample.group_id * len(batches) + index
    return [s for batch in batches for s in batch]


def log_evals(run: Run, evals: list[tuple[int, dict[str, float]]]) -> None:
    """Held-out results from the evaluating engine, each under the step of the weights it measured."""
    for version, metrics in evals:
        log(f"step {version}: held-out accuracy {metrics['eval/accuracy']:.3f}")
        run.sinks.log(version, metrics)


def send_object(obj, dst: int, group) -> tuple[list, tuple]:
    """Non-blocking send of a picklable object (size, then bytes): the works to wait on, and the buffers,
    which must stay alive until then."""
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    return [dist.isend(size, dst, group=group), dist.isend(payload, dst, group=group)], (size, payload)


def recv_object(src: int, group):
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src, group=group)
    payload = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(payload, src, group=group)
    return pickle.loads(payload.numpy().tobytes())
