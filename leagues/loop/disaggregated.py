"""Disaggregated placement: engine ranks keep generating while the trainer rank trains, within a staleness bound.

    engine ranks (the last `num_engine_ranks`)            trainer rank 0
    ──────────────────────────────────────────            ───────────────────────────────────────────
    step s: wait for weights of version >= s - k ◄─┐      recv batch s from every engine rank
            rollout + rewards of its prompt share  │      advantages, train_step          (time/train)
            isend batch s (samples, metrics) ──────┼────► broadcast weights, version s+1  (time/sync)
                                                   └───── (bucketed: header + one flat tensor per dtype)

With k = `max_staleness` = 1, batch s+1 is generated with the weights of step s-1 while step s trains: the
two overlap, and the trainer's off-policy correction (`trainer.loss.off_policy`, e.g. token_tis) handles
the lag; every sample carries the weight version it was generated with (`train/staleness` is logged).

Decisions:
- Batches travel as pickled samples over a gloo group with non-blocking sends, so an engine never waits
  for the trainer to take a batch (a blocking send would deadlock against the weight broadcast).
- Weights travel in one broadcast group (trainer + engines; NCCL on GPUs, gloo on CPUs): the run's `broadcast`
  weight sync (`leagues.sync.WEIGHT_SYNCS`). The trainer's part of a step is the colocated loop's (`learn`).
- Every engine draws the same global batch of prompts and keeps its share, and sends its prompt position
  with each batch; the trainer checkpoints the position of the last batch it trained on, so a resumed run
  regenerates exactly the batches that were not trained on.
- Each engine numbers its prompt groups from 0; the trainer renumbers them per engine (`merge_batches`), so
  groups of different engines never merge in the advantages.
- Held-out evaluation (`eval.every`) runs on the first engine rank, alone, with the weights of each evaluated
  version as they arrive: it never holds the trainer up. Its results travel with that engine's next batch (and
  a last message after the final weights); the trainer logs each under the step of the weights it measured,
  after that step's own row (`leagues report` merges the rows of a step).
- One trainer rank for now (the trainer is not sharded over a sub-group yet).
"""

import pickle

import torch
import torch.distributed as dist

from leagues.loop.config import TrainConfig
from leagues.loop.run import Run, log
from leagues.loop.train import eval_due, evaluate, finish, learn, maybe_save, merge_parts, report_failures, trainable
from leagues.rollout.generate import rollout
from leagues.types import Sample


def train_disaggregated(cfg: TrainConfig) -> list[dict[str, float]]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    num_trainers = world - cfg.num_engine_ranks
    if num_trainers != 1 or cfg.num_engine_ranks < 1:
        raise ValueError(
            f"placement disaggregated: needs exactly one trainer rank and at least one engine rank; got {world} "
            f"ranks with num_engine_ranks={cfg.num_engine_ranks} (launch with --nproc {cfg.num_engine_ranks + 1})"
        )
    if cfg.engine_urls:
        raise ValueError("placement disaggregated: engine_urls (external engines) use the colocated loop's HTTP path")
    rank = dist.get_rank()
    engines = list(range(1, world))
    data_group = dist.new_group(backend="gloo")
    run = Run.build(cfg, is_trainer=rank == 0, is_engine=rank != 0)  # its weight sync: broadcast
    try:
        if rank == 0:
            return trainer_loop(run, data_group, engines)
        engine_loop(run, data_group)
        return []
    finally:
        run.close()


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
    cfg, index, num = run.cfg, run.rank - 1, run.world - 1
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
        pending.append(send_object(message | {"eval": evaluator.take()}, dst=0, group=data_group))
    while version < cfg.steps:  # take every broadcast the trainer makes, so the collectives match
        version = receive()
    if evaluator.active and cfg.eval.every and run.held_out is not None:  # what the last weights scored
        pending.append(send_object({"eval": evaluator.take()}, dst=0, group=data_group))
    for works, _buffers in pending:
        for work in works:
            work.wait()


def trainer_loop(run: Run, data_group, engines: list[int]) -> list[dict[str, float]]:
    cfg, timer, history = run.cfg, run.timer, []
    if run.start_step:
        run.weight_sync.push(run.trainer, version=run.start_step)
    for step in range(run.start_step, cfg.steps):
        with timer.section("wait_rollout"):
            messages = [recv_object(src=e, group=data_group) for e in engines]
        everything = merge_batches([m["samples"] for m in messages])
        report_failures(everything, step, run.rank)
        samples = trainable(everything)
        train_metrics = learn(run, samples, gather=False)  # this rank alone holds the whole batch
        with timer.section("sync"):
            train_metrics |= run.weight_sync.push(run.trainer, version=step + 1)
        run.prompts.load_state_dict(messages[0]["data"])  # the position after the batch just trained on
        staleness = [step - s.weight_version for s in samples] or [0]
        metrics = merge_parts([m["metrics"] for m in messages]) | train_metrics
        metrics["train/staleness_mean"] = sum(staleness) / len(staleness)
        metrics["train/staleness_max"] = float(max(staleness))
        metrics |= maybe_save(run, step) | timer.pop()
        run.sinks.log(step + 1, metrics)
        history.append(metrics)
        log_evals(run, messages[0]["eval"])
    if cfg.eval.every and run.held_out is not None:
        log_evals(run, recv_object(src=engines[0], group=data_group)["eval"])
    log(f"disaggregated: {cfg.steps - run.start_step} steps trained")
    finish(run)
    return history


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
