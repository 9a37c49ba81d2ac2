"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

Each step is either a *prefill* step or a *decode* step:
- prefill: sequences still computing their prompt (or recomputing after preemption) and then new
  ones from `waiting`, each taking a chunk of at most the step's token budget (chunked prefill), so a
  long prompt never blocks the batch for more than one budget's worth of compute; with `mixed`
  (`EngineConfig.mixed_steps`), the running sequences' decode rows ride along in the budget left (one
  token each), so a request that arrives alone costs the others no step of their own;
- decode: every running sequence computes its one newest token and samples the next.
New requests therefore join between decode steps (the caller may hold them back for a few decode steps:
`schedule(admit=False)`, `EngineConfig.admit_after_decode_steps`). When the cache has no block for a decode, the
newest running sequence is preempted: its blocks are freed (its full blocks usually stay in the prefix
cache) and it goes back to the front of `waiting` to be recomputed later, so a full cache slows the
engine down instead of failing a request.

After each step, `postprocess` appends the sampled tokens to their sequences and says which finished
(eos or a stop token, a stop string, the token limit or the context limit: `StopRules`).
"""

from collections import deque
from dataclasses import dataclass, field

from leagues.engine.block_manager import BlockManager
from leagues.engine.sequence import PENDING, SeqStatus, Sequence
from leagues.types import FinishReason


@dataclass(slots=True)
class StopRules:
    eos_ids: set[int] = field(default_factory=set)
    tokenizer: object = None
    """Decodes outputs for stop strings; without one, stop strings are never matched."""
    max_model_len: int = 1 << 62

    @classmethod
    def of(cls, hf_config: dict, tokenizer, max_model_len: int) -> "StopRules":
        """The model's eos ids (its HF config's and its tokenizer's) with the engine's limits."""
        ids = hf_config.get("eos_token_id")
        eos = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        return cls(eos, tokenizer, max_model_len)

    def ends_in_flight(self, seq: Sequence) -> bool:
        """The token a step in flight samples for `seq` (a placeholder yet) is its last, whatever it is."""
        ids = seq.token_ids
        if ids[-1] != PENDING:
            return False
        return len(ids) - seq.num_prompt_tokens >= seq.params.max_new_tokens or len(ids) >= self.max_model_len

    def may_end(self, seq: Sequence, token: int) -> bool:
        """Whether `reason` may find a reason for `seq` to end after its newest token `token` (cheap: most rows
        of most steps go on, and for them `reason` is never called)."""
        params, num_tokens = seq.params, len(seq.token_ids)
        return (
            token in self.eos_ids
            or token in params.stop_token_ids
            or bool(params.stop)
            or num_tokens - seq.num_prompt_tokens >= params.max_new_tokens
            or num_tokens >= self.max_model_len
        )

    def reason(self, seq: Sequence) -> FinishReason | None:
        """Why `seq` ends after its newest token, or None."""
        token, params = seq.token_ids[-1], seq.params
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return FinishReason.STOP
        if params.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            hits = [text.find(s) for s in params.stop if s and s in text]
            if hits:
                seq.stop_text_end = min(hits)
                return FinishReason.STOP
        if seq.num_output_tokens >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None


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
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        chunked_prefill: bool = True,
        stop: StopRules | None = None,
        mixed: bool = False,
    ) -> None:
        """`mixed`: prefill steps carry the running sequences' decode rows too (`EngineConfig.mixed_steps`)."""
        self.blocks = blocks
        self.mixed = mixed
        self.stop = stop or StopRules()
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

    def schedule(self, admit: bool = True) -> ScheduledBatch | None:
        """The next step's batch (None: nothing to run). `admit` False leaves `waiting` where it is: the step is
        a decode of the running sequences (or the next chunks of prompts they are computing)."""
        items = self._schedule_prefill(admit)
        is_decode = not items
        if is_decode:
            items = self._schedule_decode()
        copies, self.blocks.pending_copies = self.blocks.pending_copies, []
        return ScheduledBatch(items, is_decode, copies) if items else None

    def _schedule_prefill(self, admit: bool) -> list[ScheduledSeq]:
        items: list[ScheduledSeq] = []
        budget = self.max_num_batched_tokens
        for seq in [s for s in self.running if len(s.token_ids) - s.num_computed_tokens > 1]:
            if budget <= 0 or not self._take_chunk(seq, items, budget):
                return items
            budget -= items[-1].num_new_tokens
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.blocks.admit(seq)
            if not self._take_chunk(seq, items, budget):
                self.blocks.free(seq)
                break
            budget -= items[-1].num_new_tokens
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        if self.mixed and items:
            self._ride_along(items, budget)
        return items

    def _ride_along(self, items: list[ScheduledSeq], budget: int) -> None:
        """Decode rows of the running sequences in a prefill step's budget left, where a block has room
        (a prefill step never preempts: a row without room waits for the next decode step)."""
        scheduled = {id(item.seq) for item in items}
        for seq in self.running:
            if budget <= 0:
                return
            if id(seq) in scheduled or seq.num_pending_tokens != 1 or self.stop.ends_in_flight(seq):
                continue
            if self.blocks.allocate_slots(seq, 1):
                items.append(ScheduledSeq(seq, 1))
                budget -= 1

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
        ends_in_flight, allocate_slots = self.stop.ends_in_flight, self.blocks.allocate_slots
        running = SeqStatus.RUNNING
        for seq in self.running[: self.max_num_seqs]:  # a copy: preemption removes from `running`
            if seq.status != running or ends_in_flight(seq):
                continue  # preempted by an earlier sequence of this step, or its last token is in flight
            while not allocate_slots(seq, 1):
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

    def computed(self, batch: ScheduledBatch) -> None:
        """The step ran: its tokens are in the cache (full blocks join the prefix cache)."""
        blocks = self.blocks
        if not blocks.enable_prefix_caching:
            for item in batch.items:
                item.seq.num_computed_tokens += item.num_new_tokens
            return
        block_size = blocks.block_size
        for item in batch.items:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            if seq.num_computed_tokens // block_size > len(seq.block_hashes):  # a block filled up
                blocks.register_computed(seq)

    def postprocess(
        self, rows: list[Sequence], token_ids: list[int], logprobs: list[float], top=None, version: int = 0
    ) -> list[tuple[Sequence, FinishReason]]:
        """Append each row's sampled token (and its top logprobs, as many as the row asked for) under weight
        `version`; the rows that finished, with why (the caller removes them)."""
        finished = []
        may_end, reason_of = self.stop.may_end, self.stop.reason
        for i, seq in enumerate(rows):
            token = token_ids[i]
            seq.token_ids.append(token)
            seq.logprobs.append(logprobs[i])
            if top is not None and seq.params.top_logprobs:
                k = seq.params.top_logprobs
                seq.top_logprobs.append(list(zip(top[i][0][:k], top[i][1][:k], strict=True)))
            seq.weight_version = version
            if may_end(seq, token) and (reason := reason_of(seq)) is not None:
                finished.append((seq, reason))
        return finished
