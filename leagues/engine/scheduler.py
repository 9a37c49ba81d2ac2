"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

Each step is either a *prefill* step or a *decode* step:
- prefill: sequences still computing their prompt (or recomputing after preemption) and then new
  ones from `waiting`, each taking a chunk of at most the step's token budget (chunked prefill), so a
  long prompt never blocks the batch for more than one budget's worth of compute;
- decode: every running sequence computes its one newest token and samples the next.
New requests therefore join between decode steps. When the cache has no block for a decode, the
newest running sequence is preempted: its blocks are freed (its full blocks usually stay in the prefix
cache) and it goes back to the front of `waiting` to be recomputed later, so a full cache slows the
engine down instead of failing a request.
"""

from collections import deque
from dataclasses import dataclass

from leagues.engine.block_manager import BlockManager
from leagues.engine.sequence import SeqStatus, Sequence


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """This chunk reaches the sequence's end, so the step samples its next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class ScheduledBatch:
    items: list[ScheduledSeq]
    is_decode: bool
    copies: list[tuple[int, int]]
    """Copy-on-write block copies (src, dst) to do before the step."""

    @property
    def num_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.items)


class Scheduler:
    def __init__(
        self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, chunked_prefill: bool = True
    ) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        items = self._schedule_prefill()
        is_decode = not items
        if is_decode:
            items = self._schedule_decode()
        copies, self.blocks.pending_copies = self.blocks.pending_copies, []
        return ScheduledBatch(items, is_decode, copies) if items else None

    def _schedule_prefill(self) -> list[ScheduledSeq]:
        items: list[ScheduledSeq] = []
        budget = self.max_num_batched_tokens
        for seq in [s for s in self.running if s.num_pending_tokens > 1]:
            if budget <= 0 or not self._take_chunk(seq, items, budget):
                return items
            budget -= items[-1].num_new_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.blocks.admit(seq)
            if not self._take_chunk(seq, items, budget):
                self.blocks.free(seq)
                break
            budget -= items[-1].num_new_tokens
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        return items

    def _take_chunk(self, seq: Sequence, items: list[ScheduledSeq], budget: int) -> bool:
        chunk = min(seq.num_pending_tokens, budget)
        if chunk < seq.num_pending_tokens and not self.chunked_prefill and items:
            return False  # whole prompts only: it waits for the next step
        if not self.chunked_prefill:
            chunk = seq.num_pending_tokens
        if not self.blocks.allocate_slots(seq, chunk):
            return False
        items.append(ScheduledSeq(seq, chunk))
        return True

    def _schedule_decode(self) -> list[ScheduledSeq]:
        items: list[ScheduledSeq] = []
        for seq in list(self.running)[: self.max_num_seqs]:
            if seq.status != SeqStatus.RUNNING:
                continue  # preempted by an earlier sequence of this step
            while not self.blocks.allocate_slots(seq, 1):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                items.append(ScheduledSeq(seq, 1))
        return items

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it is recomputed when scheduled again."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.FINISHED
