"""One step of the engine's batch loop: schedule, run, sample, post-process; and overlap scheduling.

`Stepper.step` runs on the engine's thread. A step is one of:
- a *launched* decode step: every row is sampled in the step itself (no truncation, no top logprobs; in
  deterministic mode too, whose logprobs the step takes by the trainer's arithmetic): `runner.launch` starts it
  (a CUDA graph's replay, else the same step run eagerly) and queues the copy of its tokens and logprobs;
  `land` waits for them and post-processes;
- any other step (prefill, chunked prompts, truncating rows): `runner.execute` returns logits, the sampler
  runs after it (prefill forks a request's n samples; batch-invariantly in deterministic mode), and the tokens
  are appended.

Overlap scheduling (`EngineConfig.overlap_scheduling`): when the next step is surely a launched decode of the
running sequences, it is launched *before* the step in flight lands. Its rows' input tokens are taken on the
device from the previous step's samples (`prev_rows`), while on the host each such sequence holds a
placeholder token (`sequence.PENDING`) for the sample in flight. So the host's scheduling, input filling
and post-processing all run while the GPU computes. The placeholder is replaced when its step lands; a
sequence that stopped there (eos, stop token or string) had one more row computed in the step already
launched, and that row is dropped. Sequences whose in-flight token is their last by length are not
scheduled again. A step that might preempt (too few free blocks), new requests it admits
(`EngineConfig.admit_after_decode_steps` may defer them), messages (aborts, weight loads, sleep) or rows that
cannot be sampled in the step make the engine land first: every decision that reads tokens sees real ones.
"""

from collections.abc import Callable
from dataclasses import replace

from leagues.engine.config import EngineConfig
from leagues.engine.requests import Requests
from leagues.engine.runner import Launched, ModelRunner
from leagues.engine.sampler import GraphSampling, SamplingTensors, row_seed, sample
from leagues.engine.scheduler import ScheduledBatch, Scheduler
from leagues.engine.sequence import PENDING, SeqStatus, Sequence


def _overlap(setting: str, device) -> bool:
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"engine.overlap_scheduling: expected auto, true or false, got {setting!r}")
    return device.type == "cuda" if setting == "auto" else setting == "true"


class Stepper:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        table: Requests,
        config: EngineConfig,
        inbox,
        weight_version: Callable[[], int],
    ) -> None:
        """`inbox`: the engine's message queue (a step in flight lands before messages are handled);
        `weight_version`: the engine's current weight version, stamped on every sampled token."""
        self.scheduler, self.runner, self.table, self.config = scheduler, runner, table, config
        self.inbox, self.weight_version = inbox, weight_version
        self.blocks, self.stats = scheduler.blocks, table.stats
        self.inflight: tuple[Launched, list[Sequence]] | None = None
        """The launched decode step whose tokens have not landed, and its rows' sequences."""
        self.overlap = _overlap(config.overlap_scheduling, runner.device)
        """Launch the next decode step before the one in flight lands (`EngineConfig.overlap_scheduling`)."""
        if config.admit_after_decode_steps < 0:
            raise ValueError(f"engine.admit_after_decode_steps: expected >= 0, got {config.admit_after_decode_steps}")
        self.decodes_in_a_row = 0
        """Decode steps since the last prefill step (`EngineConfig.admit_after_decode_steps`)."""

    def step(self) -> bool:
        """One step (or the landing of the step in flight); False when there was nothing to run."""
        if self.inflight is not None and not self._can_overlap():
            return self.land()
        batch = self.scheduler.schedule(self._admits())
        if batch is None:
            return self.inflight is not None and self.land()
        self.decodes_in_a_row = self.decodes_in_a_row + 1 if batch.is_decode else 0
        # a step in flight means `_can_overlap` vouched for this batch: a decode of running rows that all sample
        if self.inflight is not None or self._samples_in_step(batch):
            self._launch(batch)
            return True
        sampling = [item.seq for item in batch.items if item.samples]  # before `computed` moves the counts
        logits_RV = self.runner.execute(batch)
        self.scheduler.computed(batch)
        rows, index = self.table.fork(sampling)
        seeds = [row_seed(s.seed, s.sample_index) for s in rows]
        tensors = SamplingTensors.from_params([(s.params, s.num_output_tokens) for s in rows], logits_RV.device, seeds)
        result = sample(logits_RV[index], tensors, self.config.deterministic)
        top = None
        if result.top_ids_BK is not None:
            top = list(zip(result.top_ids_BK.tolist(), result.top_logprobs_BK.tolist(), strict=True))
        self._postprocess(rows, result.token_ids_B.tolist(), result.logprobs_B.tolist(), top)
        return True

    def _samples_in_step(self, batch: ScheduledBatch) -> bool:
        """A decode step whose rows the step itself samples: it is launched (`runner.launch`)."""
        if not batch.is_decode or len(batch.items) > self.runner.max_launch_rows:
            return False
        return all(item.seq.in_step and item.samples for item in batch.items)

    def _admits(self) -> bool:
        """Whether the next step may take waiting requests: nothing decodes, or enough decode steps ran since the
        last prefill step (`EngineConfig.admit_after_decode_steps`)."""
        return not self.scheduler.running or self.decodes_in_a_row >= self.config.admit_after_decode_steps

    def _can_overlap(self) -> bool:
        """The next step is surely a launched decode of running sequences (so it may start before the step in
        flight lands): no waiting sequence it would admit, no message to handle, a free block for every running
        sequence (no preemption), every running row sampled in the step."""
        s = self.scheduler
        if (s.waiting and self._admits()) or not self.inbox.empty() or len(s.running) > self.runner.max_launch_rows:
            return False
        if self.blocks.num_free_blocks < len(s.running):  # it might preempt: only a landed step does that
            return False
        return all(seq.in_step and len(seq.token_ids) - seq.num_computed_tokens == 1 for seq in s.running)

    def _launch(self, batch: ScheduledBatch) -> None:
        """Launch a decode step; then land the one in flight (its tokens are this step's inputs, taken on the
        device), so the host's bookkeeping runs while the GPU computes. Rows stay placeholders until they land."""
        seqs = [item.seq for item in batch.items]
        prev = self.inflight
        if prev is None:
            prev_rows = [-1] * len(seqs)  # every token has landed
        elif prev[1] == seqs:  # the same rows as the step in flight (the common case): no index to build
            prev_rows = [i if seq.token_ids[-1] == PENDING else -1 for i, seq in enumerate(seqs)]
        else:
            index = {id(seq): i for i, seq in enumerate(prev[1])}
            prev_rows = [index[id(seq)] if seq.token_ids[-1] == PENDING else -1 for seq in seqs]
        launched = self.runner.launch(batch, _graph_sampling(seqs), prev_rows)
        self.stats["launched_steps"] += 1
        if prev is not None:
            self.land()
            self.stats["overlapped_steps"] += 1
        running = SeqStatus.RUNNING
        alive = [item for item in batch.items if item.seq.status == running]  # none stopped landing
        self.scheduler.computed(replace(batch, items=alive) if len(alive) < len(seqs) else batch)
        for item in alive:
            item.seq.token_ids.append(PENDING)
        self.inflight = (launched, seqs)
        if not self.overlap:
            self.land()

    def land(self) -> bool:
        """Wait for the step in flight and post-process its rows (those still holding its placeholder)."""
        launched, seqs = self.inflight
        self.inflight = None
        token_ids, logprobs = self.runner.land(launched)
        keep = [i for i, seq in enumerate(seqs) if seq.token_ids[-1] == PENDING]
        if len(keep) < len(seqs):
            seqs = [seqs[i] for i in keep]
            token_ids, logprobs = [token_ids[i] for i in keep], [logprobs[i] for i in keep]
        for seq in seqs:
            seq.token_ids.pop()
        self._postprocess(seqs, token_ids, logprobs)
        return True

    def _postprocess(self, rows: list[Sequence], token_ids: list[int], logprobs: list[float], top=None) -> None:
        finished = self.scheduler.postprocess(rows, token_ids, logprobs, top, self.weight_version())
        self.table.emit(rows, token_ids, logprobs)
        for seq, reason in finished:
            self.table.finish(seq, reason)
        self.stats["steps"] += 1


def _graph_sampling(seqs: list[Sequence]) -> GraphSampling:
    """The sampling inputs of a launched decode step's rows (every one samples in the step: `Sequence.in_step`);
    a row's RNG counter is the number of tokens it has generated (a placeholder in flight counts)."""
    return GraphSampling(
        temperature=[float(seq.params.temperature) for seq in seqs],
        seeds=[seq.step_seed for seq in seqs],
        steps=[len(seq.token_ids) - seq.num_prompt_tokens for seq in seqs],
    )
