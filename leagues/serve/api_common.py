"""What the HTTP routes share: errors in OpenAI's shape, the server's state, and `Batch`, one HTTP
request's engine requests (see `server.py` for the decisions behind them)."""

import asyncio
import collections
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

from leagues.engine.output import Output
from leagues.engine.requests import prompt_ids
from leagues.serve.engine_process import EngineGone, EngineLink, InProcess
from leagues.serve.metrics import ServerMetrics
from leagues.serve.protocol import ServerLimits
from leagues.types import SamplingParams


class APIError(Exception):
    """An error answered as `{"error": {...}}` with `status` (and `headers`, such as a 401's `WWW-Authenticate`)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_body(message: str, kind: str, param: str | None = None, code: int | str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    headers: dict[str, str] | None = None,
):
    return JSONResponse(error_body(message, kind, param, status), status_code=status, headers=headers)


UNAUTHORIZED = "missing or wrong API key (Authorization: Bearer ...)"
ASK_FOR_KEY = {"WWW-Authenticate": "Bearer"}


class Caller(StrEnum):
    """Who a request comes from, as the server's auth middleware found it (`request.scope["leagues_caller"]`)."""

    ADMIN = "admin"
    """The admin key, or any caller when the server has no admin key."""
    USER = "user"
    """The API key."""
    ANONYMOUS = "anonymous"
    """No key or another one, on a server without an API key (it serves everything but admin work)."""


@dataclass(slots=True)
class ServerState:
    """What the routes share: the engine (`InProcess`, or an `EngineLink` to its process), the metrics, and the
    requests in flight."""

    engine: "InProcess | EngineLink"
    metrics: ServerMetrics
    model_path: str
    served_model_name: str
    in_flight: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.time)
    limits: ServerLimits = field(default_factory=ServerLimits)
    weights_root: Path | None = None
    """Directory `/update_weights_from_disk` may load from (anything under it); None: anywhere."""
    joining: bool = False
    """A weight-group join is under way (one at a time: each holds a worker thread until the group forms)."""
    stream_interval: int = 1
    """Tokens a streamed output gathers before the routes send them (its last chunk goes at its end whatever)."""
    fronts: int = 1
    """Front processes serving the same engine (`leagues serve --fronts`); this is one of them."""
    mailbox: "Mailbox | None" = None
    """Streamed tokens' way from the thread that delivers them to the event loop (`mailbox_of`)."""

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{secrets.token_hex(8)}"  # unguessable: a client can abort only the ids it was given


def state_of(request: Request) -> ServerState:
    return request.app.state.leagues


# --- one HTTP request's engine requests -------------------------------------------------------------


class Inbox:
    """One streaming request's events on the event loop: added one by one, taken all at once."""

    def __init__(self) -> None:
        self.items: list[tuple] = []
        self.ready = asyncio.Event()

    def add(self, event: tuple) -> None:  # on the event loop
        self.items.append(event)
        self.ready.set()

    async def take(self) -> list[tuple]:
        """Every event added since the last take (waits for one)."""
        await self.ready.wait()
        self.ready.clear()
        items, self.items = self.items, []
        return items


class Mailbox:
    """Tokens from the thread that delivers them (the engine's loop thread, or the one receiving from the engine's
    process) to one event loop, handed over in bursts: the first token after a hand-over
    schedules one wake-up of the loop, and every token that comes before it runs rides along. So a decode step of
    256 streaming rows wakes the loop once, not 256 times, and the loop never falls behind the engine by a backlog
    of wake-ups; each request's stream then takes its burst at once from its `Inbox`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.items, self.scheduled = loop, collections.deque(), False

    def put(self, inbox: Inbox, event: tuple) -> None:  # on the delivering thread; a deque needs no lock
        self.items.append((inbox, event))
        if self.scheduled:
            return  # a hand-over is scheduled and has not started: it will take this one too
        self.scheduled = True
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody is listening
            self.loop.call_soon_threadsafe(self._hand_over)

    def _hand_over(self) -> None:
        self.scheduled = False  # before draining: what comes after this schedules the next hand-over
        popleft = self.items.popleft
        with contextlib.suppress(IndexError):
            while True:
                inbox, event = popleft()
                inbox.add(event)


class PendingTokens:
    """A stream's tokens not sent yet, by output index: gathered from the bursts' events and given out once an output
    has `interval` of them (`ServerState.stream_interval`); an output's last chunk carries its rest (`drop`)."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.by_index: dict[int, tuple[list[int], list[float]]] = {}

    def add(self, index: int, token_id: int, logprob: float) -> None:
        ids, logprobs = self.by_index.setdefault(index, ([], []))
        ids.append(token_id)
        logprobs.append(logprob)

    def drop(self, index: int) -> None:
        self.by_index.pop(index, None)

    def due(self) -> list[tuple[int, list[int], list[float]]]:
        """The outputs with `interval` tokens or more, with those tokens, which leave the pending ones."""
        ready = [(i, ids, lps) for i, (ids, lps) in self.by_index.items() if len(ids) >= self.interval]
        for index, _, _ in ready:
            del self.by_index[index]
        return ready


def mailbox_of(state: "ServerState") -> Mailbox:
    """The mailbox of the running event loop (one a server; a new one if the loop changed, as in tests)."""
    loop = asyncio.get_running_loop()
    if state.mailbox is None or state.mailbox.loop is not loop:
        state.mailbox = Mailbox(loop)
    return state.mailbox


class _Tracker:
    """The engine's `on_token` for one prompt: timestamps every token and, when streaming, queues it."""

    def __init__(self, mailbox: Mailbox, inbox: Inbox | None, base: int, n: int):
        self.mailbox, self.inbox, self.base = mailbox, inbox, base
        self.times: list[list[float]] = [[] for _ in range(n)]

    def __call__(self, index: int, token_id: int, logprob: float) -> None:  # on the delivering thread
        self.times[index].append(time.monotonic())
        if self.inbox is not None:
            self.mailbox.put(self.inbox, ("token", self.base + index, token_id, logprob))


OFF_LOOP_BYTES = 1 << 16
"""Requests with bodies larger than this are tokenized (and their chat templates rendered) in a worker thread, so
the event loop keeps serving every other request's stream meanwhile: a text of megabytes takes seconds to encode,
and the tokenizer's core runs without holding the interpreter lock. Smaller ones stay on the loop, where the
thread hop would cost more than their encoding."""


async def off_loop_if_large(request: Request, fn, *args):
    """`fn(*args)`, in a worker thread when the request's body is over `OFF_LOOP_BYTES` (its size as the body-limit
    middleware read it)."""
    if request.scope.get("leagues_body_bytes", 0) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def admit(state: ServerState, prompts: list, params: SamplingParams, field: str) -> list[list[int]]:
    """The prompts as token ids, once the engine is awake and the request is within the server's limits (400 or
    503 as an `APIError` otherwise). Safe in a worker thread (`off_loop_if_large`)."""
    engine, limits = state.engine, state.limits
    if engine.asleep:  # its memory is released: a request would wait for a wake nobody may send
        raise APIError(503, "the engine is asleep (memory released); retry once it resumes", kind="server_error")
    num_seqs = len(prompts) * params.n  # n alone is capped; a batch of prompts times n is too
    if num_seqs > limits.max_request_sequences:
        limit = limits.max_request_sequences
        raise APIError(400, f"{field}: {len(prompts)} prompts x n {params.n} is over {limit} sequences", param=field)
    try:
        ids = [prompt_ids(p, engine.tokenizer) for p in prompts]
    except ValueError as err:
        raise APIError(400, f"{field}: {err}", param=field) from None
    tokens = params.n * sum(min(len(i) + params.max_new_tokens, engine.max_model_len) for i in ids)
    if tokens > limits.max_request_tokens:
        limit = limits.max_request_tokens
        message = f"{field}: {num_seqs} sequences of up to {tokens} tokens in all, over the limit of {limit}"
        raise APIError(400, message + " (send fewer prompts, a smaller n or fewer max tokens)", param=field)
    return ids


class Batch:
    """The engine requests of one HTTP request: one per prompt (token ids `admit` gave), each with `params.n`
    samples.

    Outputs are indexed prompt-major: output `i * n + j` is sample `j` of prompt `i`. `field` names the
    request field that holds the prompts, for errors.
    """

    def __init__(
        self,
        state: ServerState,
        prompts: list[list[int]],
        params: SamplingParams,
        rids: list[str],
        stream: bool,
        field: str,
    ):
        self.state, self.params, self.rids = state, params, rids
        self.start = time.monotonic()
        mailbox = mailbox_of(state)
        self.inbox = Inbox() if stream else None
        self.trackers = [_Tracker(mailbox, self.inbox, i * params.n, params.n) for i in range(len(prompts))]
        self.futures: list[Future] = []
        try:
            for prompt, rid, tracker in zip(prompts, rids, self.trackers, strict=True):
                self.futures.append(state.engine.submit(prompt, params, rid, tracker))
                state.in_flight.add(rid)
        except ValueError as err:  # the engine's checks of the prompt and the params: name the field
            self.abort()
            raise APIError(400, f"{field}: {err}", param=field) from None
        except EngineGone as err:
            self.abort()
            raise gone(err) from None
        except BaseException:
            self.abort()
            raise
        self.waiters = [asyncio.wrap_future(f) for f in self.futures]
        if self.inbox is not None:
            for i, waiter in enumerate(self.waiters):
                waiter.add_done_callback(lambda w, i=i: self.inbox.add(("done", i, w)))

    def abort(self) -> None:
        for rid, future in zip(self.rids, self.futures, strict=False):
            if not future.done() or future.cancelled():  # cancelling the awaiting handler cancels its futures
                self.state.engine.abort(rid)
        self._forget()

    def _forget(self) -> None:
        for rid in self.rids:
            self.state.in_flight.discard(rid)

    async def results(self) -> list[Output]:
        """Every output, prompt-major; cancelling the caller aborts the engine requests."""
        try:
            per_prompt = await asyncio.gather(*self.waiters)
        except BaseException as err:
            self.abort()
            if isinstance(err, EngineGone):
                raise gone(err) from None
            raise
        return self._finish(per_prompt)

    def _finish(self, per_prompt: list[list[Output]]) -> list[Output]:
        self._forget()
        end = time.monotonic()
        metrics = self.state.metrics
        outputs = [o for outs in per_prompt for o in outs]
        for tracker, outs in zip(self.trackers, per_prompt, strict=True):
            metrics.prompt_tokens.inc(len(outs[0].prompt_token_ids))
            first = outs[0]
            if first.first_token_time:
                metrics.engine_ttft.observe(first.first_token_time - first.arrival_time)
                metrics.to_engine.observe(first.arrival_time - self.start)
                if tracker.times[first.index]:
                    metrics.from_engine.observe(tracker.times[first.index][0] - first.first_token_time)
            for o in outs:
                metrics.observe_sample(self.start, tracker.times[o.index], end)
        for o in outputs:
            metrics.generated_tokens.inc(len(o.token_ids))
            metrics.finished.labels(finish_reason=str(o.finish_reason)).inc()
        return outputs

    async def events(self) -> AsyncIterator[list[tuple]]:
        """Lists of the events that have come since the last one was taken, in order: `("token", index, token_id,
        logprob)` as tokens come, `("done", prompt_index, outputs)` per prompt. A stream that falls behind the
        engine so gets several tokens at once and answers them in one write."""
        assert self.inbox is not None, "events() needs stream=True"
        done: dict[int, list[Output]] = {}
        try:
            while len(done) < len(self.waiters):
                events = await self.inbox.take()
                for k, event in enumerate(events):
                    if event[0] == "done":
                        done[event[1]] = event[2].result()  # raises the engine's error, if any
                        events[k] = ("done", event[1], done[event[1]])
                yield events
        except BaseException:
            self.abort()
            raise
        self._finish([done[i] for i in range(len(self.waiters))])


def gone(err: EngineGone) -> APIError:
    """The 503 of a request whose engine process has exited (a router sends it elsewhere)."""
    return APIError(503, str(err), kind="server_error")


def finite(x: float) -> float | None:
    """JSON has no inf/nan: a non-finite logprob becomes null."""
    return x if x == x and abs(x) != float("inf") else None
