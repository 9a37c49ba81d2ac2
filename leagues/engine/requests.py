"""The requests an engine has in flight: the loop's inbox messages, admission, forks, finishing, failing.

Callers talk to the engine's thread only through typed messages (`Add`, `Abort`, `Call`) and futures;
`Requests` is what that thread keeps per request. A request with `n` samples starts as one sequence and
forks once its prompt is computed (`fork`): the samples share the prompt's KV blocks, each with its own
seed. A future is settled with `resolve`, which never raises on the engine's thread when its caller gave
up on it (a cancelled future: a client timed out).
"""

import contextlib
import itertools
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace

from leagues.engine.block_manager import BlockManager
from leagues.engine.output import RequestState, make_outputs
from leagues.engine.scheduler import Scheduler
from leagues.engine.sequence import Sequence
from leagues.types import FinishReason, SamplingParams

TokenCallback = Callable[[int, int, float], None]
"""on_token(sample_index, token_id, logprob): one sampled token of a request, called on the engine thread."""


@dataclass(slots=True)
class Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    future: Future
    on_token: TokenCallback | None = None
    posted_at: float = field(default_factory=time.monotonic)
    """When the caller posted it (the engine's stats sum the time requests wait in its inbox)."""


@dataclass(slots=True)
class Abort:
    request_id: str


@dataclass(slots=True)
class Call:
    fn: Callable
    args: tuple
    future: Future


def resolve(future: Future, result=None, error: Exception | None = None) -> None:
    """Settle a caller's future unless the caller gave up on it (cancelled)."""
    with contextlib.suppress(InvalidStateError):
        future.set_exception(error) if error is not None else future.set_result(result)


def prompt_ids(prompt: list[int] | str, tokenizer) -> list[int]:
    """Token ids of a prompt given as ids or as text (which needs a tokenizer)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids or Engine(..., tokenizer=...)")
        return tokenizer.encode(prompt, add_special_tokens=False)
    return list(prompt)


@dataclass(frozen=True, slots=True)
class PromptLimits:
    """What a request must fit to run on an engine (its vocabulary, context and KV cache): the engine checks every
    request against them, and a front in another process checks before sending (`leagues.serve.engine_process`)."""

    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int
    capture_routes: bool

    def check(self, ids: list[int], params: SamplingParams) -> None:
        """A ValueError saying why the request cannot run, if it cannot."""
        if not ids:
            raise ValueError("prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"prompt has token ids outside the vocabulary (0..{self.vocab_size - 1})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the limit is {self.max_model_len - 1}")
        if -(-len(ids) // self.block_size) >= self.num_blocks:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the KV cache")
        if params.return_routed_experts and not self.capture_routes:
            raise ValueError("return_routed_experts needs an MoE model and capture_routes=True")


class Requests:
    """Per-request state, owned by the engine's thread."""

    def __init__(self, scheduler: Scheduler, blocks: BlockManager, tokenizer, routes_of, seed: int) -> None:
        self.scheduler, self.blocks, self.tokenizer, self.routes_of = scheduler, blocks, tokenizer, routes_of
        self.states: dict[str, RequestState] = {}
        self.stats = {"requests": 0, "inbox_wait_s": 0.0, "prompt_tokens": 0, "generated_tokens": 0, "cached_tokens": 0,
                      "steps": 0, "launched_steps": 0, "overlapped_steps": 0}  # fmt: skip
        self._rng = random.Random(seed)
        self._ids = itertools.count()

    def add(self, add: Add, weight_version: int) -> None:
        rid, prompt_ids, params = add.request_id, add.prompt_ids, add.params
        if rid in self.states:
            resolve(add.future, error=ValueError(f"request id {rid!r} is already in flight"))
            return
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        if params.seed is None:  # the sampler rejects sampled rows without a seed
            params = replace(params, seed=base_seed)
        seq = Sequence(next(self._ids), rid, 0, list(prompt_ids), len(prompt_ids), params, base_seed,
                       num_forks=params.n - 1, first_weight_version=weight_version)  # fmt: skip
        now = time.monotonic()
        self.states[rid] = RequestState(rid, add.future, [seq], params.n, on_token=add.on_token, arrival_time=now)
        self.stats["requests"] += 1
        self.stats["inbox_wait_s"] += now - add.posted_at  # waiting for the loop to end its step
        self.stats["prompt_tokens"] += len(prompt_ids)
        if params.max_new_tokens == 0:
            self.finish(seq, FinishReason.LENGTH)
            return
        self.scheduler.add(seq)

    def abort(self, rid: str) -> None:
        state = self.states.get(rid)
        for seq in list(state.seqs) if state is not None else []:
            if seq.finish_reason is None:
                self.finish(seq, FinishReason.ABORT)

    def fork(self, sampling: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """Sequences that sample, with their siblings forked off where a prompt just completed; each row's
        index into `sampling` (siblings read their parent's logits row)."""
        rows, index = [], []
        for r, seq in enumerate(sampling):
            rows.append(seq)
            index.append(r)
            state = self.states[seq.request_id]
            for _ in range(seq.num_forks):
                child = replace(seq, seq_id=next(self._ids), sample_index=len(state.seqs),
                                token_ids=list(seq.token_ids), logprobs=[], top_logprobs=[], block_table=[],
                                block_hashes=[], num_forks=0)  # fmt: skip
                self.blocks.fork(seq, child)
                state.seqs.append(child)
                self.scheduler.running.append(child)
                rows.append(child)
                index.append(r)
            seq.num_forks = 0
        return rows, index

    def emit(self, rows: list[Sequence], token_ids: list[int], logprobs: list[float]) -> None:
        """Each row's new token to its request's `on_token` (streaming); a request's first token is timed here."""
        self.stats["generated_tokens"] += len(rows)
        now = time.monotonic()
        for seq, token, logprob in zip(rows, token_ids, logprobs, strict=True):
            state = self.states[seq.request_id]
            if not state.first_token_time:
                state.first_token_time = now
            if state.on_token is not None:
                try:
                    state.on_token(seq.sample_index, token, logprob)
                except Exception:  # a broken listener loses its stream; the batch and the request go on
                    state.on_token = None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        state = self.states[seq.request_id]
        if seq.params.return_routed_experts and seq.num_computed_tokens > 0:
            routes = self.routes_of(seq.block_table, seq.num_computed_tokens)
            state.routes[seq.sample_index] = routes[seq.params.routed_experts_start :]
        self.stats["cached_tokens"] += seq.num_cached_prompt_tokens
        self.scheduler.remove(seq)
        if all(s.finish_reason is not None for s in state.seqs):
            del self.states[state.request_id]
            resolve(state.future, make_outputs(state, self.tokenizer))

    def fail_all(self, err: Exception) -> None:
        """Fail every request in flight with `err`."""
        for rid in list(self.states):
            state = self.states.pop(rid)
            for seq in state.seqs:
                self.scheduler.remove(seq)
            resolve(state.future, error=err)
