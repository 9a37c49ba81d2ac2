"""Agent sessions: an agent that speaks OpenAI's chat API records token-exact turns into a ledger.

    POST /sessions                               {"seed": 7}                  -> {"id": "s-..."}
    POST /sessions/{id}/v1/chat/completions      OpenAI chat body (tools too) -> OpenAI chat answer (or stream)
    POST /sessions/{id}/close                    {"reward": 1.0}              -> {"sample": {...}}

Where it sits: the HTTP front. `leagues train --agent module:run` serves these routes on loopback beside the
rollout (`LoopbackSessions`) and hands each sample's session URL to the user's agent (`leagues.agent.agents`);
`leagues serve` mounts them too, so any OpenAI-speaking agent can be recorded against a served model. A session
reaches the engine only through an `EngineClient`.

Decisions:
- The first request's messages (and tools) are rendered once into the ledger's prompt; every later request
  must repeat the session's conversation so far, message by message (role, content, tool calls, tool-call
  ids), then add the new messages (tool results, user turns), which go in as a token bridge. A history that
  differs is refused (400) naming the first message that differs: the agent rewrote its past, and training
  on it would train on tokens the model never saw. The assistant messages to repeat are the ones the
  session answered, as it answered them.
- Client-sent token ids, logprob flags and seeds are ignored for the trajectory (in training runs the
  temperature and top-p too: the run's hold, so the trainer's temperature is the one that sampled): the
  engine samples from the ledger's ids, turn t with the seed `turn_seed(session seed, t)` and the call ids
  `call_<turn>_<index>`, as the `Env` loop does, so an agent through a session and the same conversation
  through an `Env` give the same sample.
- The answer is read from the sampled text by `reply.Reply` (`reasoning_content`, content, `tool_calls`), as the
  plain OpenAI route reads it; `stream: true` sends the same answer as SSE chunks while the turn samples (an
  in-process engine streams token by token; over HTTP the turn's tokens arrive at once). The ledger records the
  sampled token ids either way: the reply is a view of the turn, never what is recorded.
- A forced call (`tool_choice` "required" or a named function) is prefilled: the call's opening
  (`reply.call_prefill`) is appended to the ledger as context (mask 0: the model did not sample it) and the
  model's continuation as sampled (mask 1); the reply reads both. A repeated history sends that call as the
  session answered it.
- A turn runs apart from the HTTP request that asked for it: a client that leaves (streaming or not) aborts
  the engine request, and the tokens sampled so far are recorded with termination abort, as any aborted turn
  is. One turn at a time: a request while a turn samples is refused.
- A turn that stops on its token limit ends the session's sampling (a later request is refused, 400);
  `close` gives the trajectory as a `Sample` with its termination.
- On `leagues serve` the store is bounded like the server's other routes: at most `limits.max_sessions` sessions
  open (429 beyond; closing a session frees its place, also before its first turn, which gives no sample), new
  sessions and turns answer 503 while the engine sleeps (checked before the ledger grows, so the same request
  can be sent again), and a sampling turn is one of the server's requests in flight (`ServedClient`), which
  `/abort_request {"abort_all": true}` aborts.
- The routes here parse plain JSON (not the server's pydantic models, which are the OpenAI routes' own);
  unknown fields are ignored.
- An agent run's session server (`LoopbackSessions`) is a uvicorn server on 127.0.0.1 and a free port, run as
  a task on the rollout's own event loop (started with the first sample), so sessions reach the engine through
  the run's client on the loop that client belongs to.
"""

import asyncio
import json
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

from leagues.agent.env import call_id
from leagues.agent.ledger import Ledger, Termination
from leagues.agent.multi_turn import turn_seed
from leagues.agent.render import ChatRender
from leagues.engine.client import EngineClient, LocalClient
from leagues.engine.output import Output
from leagues.serve.reply import Reply, TextStream, call_prefill, opens_thinking, sse
from leagues.types import FinishReason, Sample, SamplingParams

if TYPE_CHECKING:  # the HTTP routes' module, imported where a stream needs it
    from leagues.serve.api_common import Inbox


class SessionError(ValueError):
    """A request the session cannot take (the HTTP routes answer 400 with its message)."""


class Unavailable(Exception):
    """A request the store cannot take now, whatever it asks: `status` 503 (the engine is asleep) or 429 (as many
    sessions are open as the store allows)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Session:
    id: str
    seed: int
    ledger: Ledger | None = None
    messages: list[dict] = field(default_factory=list)
    """The conversation so far, as the template reads it (what a later request must repeat)."""
    termination: Termination | None = None
    turn: int = 0
    unclosed: bool = False
    """The last turn ended without the model's stop token."""
    params: SamplingParams | None = None
    """Sampling defaults of this session (the store's when None)."""
    busy: bool = False
    """A turn is sampling."""


@dataclass(slots=True)
class Turn:
    """One chat completion of a session: its engine request and the reader of its reply."""

    session: Session
    params: SamplingParams
    reply: Reply
    request_id: str
    tokens: "Inbox | None" = None
    """Streamed: the sampled token ids as they come, then None (an `api_common.Inbox`, taken in bursts)."""
    task: asyncio.Future | None = None
    """The turn's sampling, which records it in the ledger."""


def _comparable(message: dict) -> dict:
    """What must match between a message the session knows and the one a request repeats."""
    calls = [
        (c.get("id"), c["function"]["name"], _decoded(c["function"].get("arguments")))
        for c in message.get("tool_calls") or []
    ]
    return {
        "role": message.get("role"),
        "content": _text(message.get("content")),
        "tool_calls": calls,
        "tool_call_id": message.get("tool_call_id"),
    }


def _decoded(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments or "{}")
        except json.JSONDecodeError:
            return arguments
    return arguments


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def _template_input(message: dict) -> dict:
    out = {"role": message.get("role"), "content": _text(message.get("content"))}
    if message.get("reasoning_content"):
        out["reasoning_content"] = message["reasoning_content"]
    if message.get("tool_call_id") is not None:
        out["tool_call_id"] = message["tool_call_id"]
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {"id": c.get("id"), "type": "function",
             "function": {"name": c["function"]["name"], "arguments": _decoded(c["function"].get("arguments"))}}
            for c in message["tool_calls"]
        ]  # fmt: skip
    return out


@dataclass(frozen=True, slots=True)
class Rendered:
    """A chat request rendered against its session as it was (`SessionStore.render`): applied only if the session
    still has `known` messages and (`first`) no ledger yet, else rendered again."""

    known: int
    first: bool
    ids: list[int]
    messages: list[dict]


class SessionStore:
    """The sessions of one engine client and tokenizer."""

    def __init__(
        self,
        client: EngineClient,
        tokenizer,
        params: SamplingParams | None = None,
        client_sampling: bool = True,
        max_sessions: int | None = None,
        asleep: Callable[[], bool] | None = None,
    ) -> None:
        self.client, self.render_chat, self.parser = client, ChatRender(tokenizer), "hermes"
        self.max_sessions = max_sessions
        """Sessions open at once (None: no limit); `create` beyond it is `Unavailable` (429) until some close."""
        self.asleep = asleep
        """Whether the engine is asleep (its memory released): new sessions and turns are then `Unavailable`
        (503) rather than queued for a wake that may not come; None: never asks."""
        self.params = params or SamplingParams()
        """Sampling defaults (temperature, top-p, max tokens)."""
        self.client_sampling = client_sampling
        """A request's temperature and top-p replace the defaults; False (training): the run's settings hold, so
        the trainer's temperature is the one that sampled, and a request's max tokens can only lower the limit."""
        self.sessions: dict[str, Session] = {}
        self._mailbox = None
        """Streamed tokens' hand-over to the event loop (`api_common.Mailbox`), made on the first stream."""
        self._aborts: set[asyncio.Future] = set()
        """Aborts of turns whose client left, in flight (held so they are not collected)."""

    def create(self, seed: int | None = None, params: SamplingParams | None = None) -> Session:
        self._check_available()
        if self.max_sessions is not None and len(self.sessions) >= self.max_sessions:
            raise Unavailable(429, f"{len(self.sessions)} sessions are open, the server's limit; close some first")
        seed = secrets.randbelow(2**31) if seed is None else seed
        session = Session(id="s-" + secrets.token_hex(8), seed=seed, params=params)
        self.sessions[session.id] = session
        return session

    def _check_available(self) -> None:
        if self.asleep is not None and self.asleep():
            raise Unavailable(503, "the engine is asleep (memory released); retry once it resumes")

    def get(self, session_id: str) -> Session:
        if session_id not in self.sessions:
            raise KeyError(f"no session {session_id!r}")
        return self.sessions[session_id]

    async def chat(self, session_id: str, body: dict, rendered: "Rendered | None" = None) -> dict:
        """One chat completion in the session; the answer in OpenAI's shape (`rendered`: as `begin`'s)."""
        turn = self.begin(session_id, body, rendered=rendered)
        try:
            out = await asyncio.shield(turn.task)
        except asyncio.CancelledError:  # the client left: the turn ends as an abort and is recorded so
            self._abort(turn)
            raise
        message, finish = turn.reply.message(out.text, str(out.finish_reason))
        return _answer(turn, message, finish, out)

    async def stream(self, turn: Turn, usage: bool = False) -> AsyncIterator[dict]:
        """The answer of a turn begun with `stream=True`, as OpenAI chat chunks while it samples."""
        text = TextStream(self.render_chat.tokenizer, turn.params.stop)
        try:
            yield _chunk(turn, {"role": "assistant", "content": ""})
            while True:
                burst = await turn.tokens.take()
                ended = burst[-1] is None
                ids = burst[:-1] if ended else burst
                if ids:
                    text.extend(ids, [0.0] * len(ids))
                    for delta in turn.reply.deltas(text.text):
                        yield _chunk(turn, delta)
                if ended:
                    break
        except BaseException:  # the client left (cancelled, or the stream closed): abort; the turn is recorded
            self._abort(turn)
            raise
        try:
            out = turn.task.result()
        except ValueError as err:  # the engine refused the request (SessionError, LedgerError, its own checks)
            yield {"error": {"message": str(err), "type": "invalid_request_error"}}
            return
        _, finish, deltas = turn.reply.finish(out.text, str(out.finish_reason))
        for delta in deltas:
            yield _chunk(turn, delta)
        yield _chunk(turn, {}, finish)
        if usage:
            yield _chunk(turn, None) | {"usage": _usage(out)}

    def _abort(self, turn: Turn) -> None:
        if not turn.task.done():
            self._aborts.add(abort := asyncio.ensure_future(self.client.abort(turn.request_id)))
            abort.add_done_callback(self._aborts.discard)

    def begin(self, session_id: str, body: dict, stream: bool = False, rendered: "Rendered | None" = None) -> Turn:
        """Check a chat request, append what it adds to the session's ledger (the new messages, and a forced
        call's opening) and start sampling the turn; `stream`: queue its tokens as they come (`stream`);
        `rendered`: what `render` made of the request (else it is rendered here)."""
        session = self.get(session_id)
        self._check_available()  # before the ledger grows: the agent can send the same request again
        if session.termination is not None:
            raise SessionError(f"session {session_id}: sampling ended ({session.termination}); close it")
        if session.busy:
            raise SessionError(f"session {session_id}: a turn is sampling; one turn at a time")
        messages, tools = body.get("messages"), body.get("tools") or None
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise SessionError("messages: a non-empty list of message objects")
        names = [t.get("function", {}).get("name") for t in tools or [] if isinstance(t, dict)]
        choice = body.get("tool_choice")
        call_prefill(choice, names, False)  # refuse a bad tool_choice before the ledger grows
        params = self._params(session, body)
        self._extend(session, messages, tools, rendered)
        ledger = session.ledger
        thinking = opens_thinking(self.render_chat.tokenizer.decode(ledger.token_ids[-16:]))
        prefill = call_prefill(choice, names, thinking)
        if prefill:
            ledger.append_context(self.render_chat.tokenizer.encode(prefill, add_special_tokens=False))
        parses = bool(tools) and choice != "none"
        reply = Reply(tools=parses, thinking=thinking, prefill=prefill, call_id=partial(call_id, session.turn))
        turn = Turn(session, params, reply, request_id=f"{session.id}-{session.turn}")
        on_token = None
        if stream:
            from leagues.serve.api_common import Inbox, Mailbox  # the HTTP routes' burst hand-over

            loop = asyncio.get_running_loop()
            if self._mailbox is None or self._mailbox.loop is not loop:
                self._mailbox = Mailbox(loop)
            mailbox, turn.tokens = self._mailbox, Inbox()
            on_token = lambda i, token, lp: mailbox.put(turn.tokens, token)  # noqa: E731 (one loop wake a burst)
        session.busy = True  # until the turn is recorded
        turn.task = asyncio.ensure_future(self._sample(turn, on_token))
        if stream:
            turn.task.add_done_callback(lambda _: turn.tokens.add(None))
        return turn

    def render(self, session_id: str, body: dict) -> "Rendered | None":
        """What a chat request adds to its session, rendered for `begin` to apply (the chat template and the
        tokenizer, which take seconds for a long conversation); safe in a worker thread. None for a request `begin`
        will refuse anyway, or one whose history does not match (`begin` says why)."""
        session = self.sessions.get(session_id)
        messages, tools = body.get("messages"), body.get("tools") or None
        if session is None or not isinstance(messages, list) or not messages:
            return None
        known, first = len(session.messages), session.ledger is None
        try:
            return Rendered(known, first, *self._render(session, messages, tools))
        except Exception:  # noqa: BLE001 (`begin` renders it again on the loop and answers its error)
            return None

    def _render(self, session: Session, messages: list[dict], tools) -> tuple[list[int], list[dict]]:
        """The ids the request adds to the ledger (the whole prompt for a session's first request, else the bridge to
        its new messages) and those messages as the template reads them; the history must match the session's."""
        if session.ledger is None:
            new = [_template_input(m) for m in messages]
            return self.render_chat.prompt(new, tools), new
        known = session.messages
        for i, (have, sent) in enumerate(zip(known, messages, strict=False)):
            if _comparable(have) != _comparable(sent):
                raise SessionError(f"messages[{i}]: differs from the session's conversation (its {have['role']} "
                                   "message as recorded); a session's history can only grow")  # fmt: skip
        new = messages[len(known) :]
        if len(messages) < len(known) or not new or any(m.get("role") == "assistant" for m in new):
            raise SessionError(
                f"messages: repeat the session's {len(known)} messages and add the new ones (tool results, user "
                "turns; no assistant message the session did not answer)"
            )
        new = [_template_input(m) for m in new]
        return self.render_chat.bridge(new), new

    def _extend(self, session: Session, messages: list[dict], tools, rendered: "Rendered | None" = None) -> None:
        """Match the request's history against the session and append what is new to the ledger (as `rendered`
        says, when it was rendered against the session as it still is)."""
        current = rendered is not None and (rendered.known, rendered.first) == (
            len(session.messages),
            session.ledger is None,
        )
        ids, new = (rendered.ids, rendered.messages) if current else self._render(session, messages, tools)
        if session.ledger is None:
            session.ledger, session.messages = Ledger(ids), new
            return
        session.ledger.append_context((self.render_chat.stop_ids if session.unclosed else []) + ids)
        session.messages += new

    def _params(self, session: Session, body: dict) -> SamplingParams:
        defaults = session.params or self.params
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or defaults.max_new_tokens
        params = replace(defaults, n=1, seed=turn_seed(session.seed, session.turn), ignore_eos=False)
        try:
            if self.client_sampling:
                return replace(params, max_new_tokens=int(limit),
                               temperature=float(body.get("temperature", params.temperature)),
                               top_p=float(body.get("top_p", params.top_p)))  # fmt: skip
            return replace(params, max_new_tokens=min(int(limit), params.max_new_tokens))
        except (TypeError, ValueError) as e:
            raise SessionError(f"sampling: {e}") from None

    async def _sample(self, turn: Turn, on_token=None) -> Output:
        """Sample the turn from the ledger's ids and record it; runs to its end whoever awaits it."""
        session, ledger = turn.session, turn.session.ledger
        request = list(ledger.token_ids)
        ledger.check_request(request)
        params = replace(turn.params, routed_experts_start=ledger.routes_start)
        try:
            kwargs = {"on_token": on_token} if on_token is not None else {}
            out = (await self.client.generate(request, params, turn.request_id, **kwargs))[0]
        finally:
            session.busy = False
        ledger.append_sampled(out.token_ids, out.logprobs, out.weight_version)
        if out.routed_experts is not None and out.finish_reason != FinishReason.ABORT:
            ledger.add_routes(out.routed_experts)
        session.turn += 1
        if out.finish_reason == FinishReason.LENGTH:
            session.termination = Termination.LENGTH
        elif out.finish_reason == FinishReason.ABORT:
            session.termination = Termination.ABORT
        # a stop string or token other than the model's: the next bridge closes the turn as the template does
        session.unclosed = out.token_ids[-1:] != self.render_chat.stop_ids[-1:]
        message, _ = turn.reply.message(out.text, str(out.finish_reason))
        session.messages.append(_template_input(message))  # what the agent will repeat
        return out

    def close(self, session_id: str, reward: float | None = None) -> Sample:
        """The session's trajectory as one `Sample` (reward in `metadata["env_reward"]`); the session ends."""
        session = self.get(session_id)
        if session.ledger is None:
            del self.sessions[session_id]  # gone all the same: an agent that gave up frees its place
            raise SessionError(f"session {session_id}: closed before any chat completion (no sample)")
        if session.busy:
            raise SessionError(f"session {session_id}: a turn is sampling; close it once the turn is recorded")
        del self.sessions[session_id]
        termination = session.termination or Termination.DONE
        sample = session.ledger.to_sample(termination)
        final = next((m for m in reversed(session.messages) if m["role"] == "assistant"), {})
        sample.metadata |= {"messages": session.messages, "response_text": final.get("content", ""),
                            "env_reward": reward, "turn_rewards": [], "env_info": {}}  # fmt: skip
        return sample


class ServedClient(LocalClient):
    """The sessions' client on `leagues serve`: each turn is one of the server's requests in flight while it
    samples, so `/abort_request {"abort_all": true}` reaches it as it reaches the other routes' requests."""

    def __init__(self, engine, in_flight: set[str]) -> None:
        super().__init__(engine)
        self.in_flight = in_flight

    async def generate(self, prompt_ids, params, request_id=None, on_token=None) -> list[Output]:
        if request_id is not None:
            self.in_flight.add(request_id)
        try:
            return await super().generate(prompt_ids, params, request_id, on_token)
        finally:
            self.in_flight.discard(request_id)


def _usage(out: Output) -> dict:
    usage = {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.token_ids)}
    return usage | {"total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


def _answer(turn: Turn, message: dict, finish: str, out: Output) -> dict:
    return {
        "id": turn.request_id,
        "object": "chat.completion",
        "model": "leagues-session",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": _usage(out),
    }


def _chunk(turn: Turn, delta: dict | None, finish: str | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    shell = {"id": turn.request_id, "object": "chat.completion.chunk", "model": "leagues-session"}
    return shell | {"choices": [choice] if delta is not None else []}


def session_router(store: SessionStore):
    """The session routes over `store`, as a FastAPI router (mounted by `leagues serve` and by agent runs)."""
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    from leagues.serve.api_common import OFF_LOOP_BYTES

    router = APIRouter(tags=["sessions"])

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise SessionError("the body must be a JSON object")
        return body

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

    async def guarded(fn):
        try:
            return await fn()
        except KeyError as e:
            return error(404, str(e.args[0]))
        except ValueError as e:  # SessionError, LedgerError: the request's fault
            return error(400, str(e))
        except Unavailable as e:
            return error(e.status, str(e))

    @router.post("/sessions")
    async def create(request: Request):
        async def go():
            body = await body_of(request) if await request.body() else {}
            seed = body.get("seed")
            if seed is not None and (not isinstance(seed, int) or seed < 0):
                raise SessionError(f"seed: a non-negative integer, got {seed!r}")
            return {"id": store.create(seed).id}

        return await guarded(go)

    @router.post("/sessions/{session_id}/v1/chat/completions")
    async def chat(session_id: str, request: Request):
        async def go():
            body = await body_of(request)
            rendered = None
            if request.scope.get("leagues_body_bytes", 0) > OFF_LOOP_BYTES:  # keep the loop serving the others
                rendered = await asyncio.to_thread(store.render, session_id, body)
            if not body.get("stream"):
                return await store.chat(session_id, body, rendered)
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = store.stream(store.begin(session_id, body, stream=True, rendered=rendered), usage)
            return StreamingResponse(_sse(chunks), media_type="text/event-stream")

        return await guarded(go)

    @router.post("/sessions/{session_id}/close")
    async def close(session_id: str, request: Request):
        async def go():
            body = await body_of(request) if await request.body() else {}
            reward = body.get("reward")
            if reward is not None and not isinstance(reward, int | float):
                raise SessionError(f"reward: a number, got {reward!r}")
            return {"sample": sample_json(store.close(session_id, reward))}

        return await guarded(go)

    return router


async def _sse(chunks: AsyncIterator[dict]):
    async for chunk in chunks:
        yield sse(chunk)
    yield sse("[DONE]")


def sample_json(sample: Sample) -> dict:
    """A closed session's sample as JSON (routes as a nested list [T-1][L][K])."""
    routes = sample.routed_experts
    return {
        "prompt_ids": sample.prompt_ids,
        "response_ids": sample.response_ids,
        "loss_mask": sample.loss_mask,
        "rollout_logprobs": sample.rollout_logprobs,
        "status": str(sample.status),
        "weight_version": sample.weight_version,
        "routed_experts": None if routes is None else routes.tolist(),
        "metadata": {k: v for k, v in sample.metadata.items() if k != "env_info"},
    }


class LoopbackSessions:
    """The session server of one agent run (`leagues.agent.agents.SessionServer`): on 127.0.0.1 and a free port,
    started on the running loop with the first session."""

    def __init__(self) -> None:
        self.url, self.store, self._server, self._task = "", None, None, None

    async def open(self, client: EngineClient, tokenizer, params: SamplingParams, seed: int) -> tuple[str, str]:
        store = await self._start(client, tokenizer, params)
        session = store.create(seed, params)
        return session.id, f"{self.url}/sessions/{session.id}/v1"

    def close(self, session_id: str, reward: float | None) -> Sample:
        return self.store.close(session_id, reward)

    def discard(self, session_id: str) -> None:
        self.store.sessions.pop(session_id, None)

    async def _start(self, client: EngineClient, tokenizer, params: SamplingParams) -> SessionStore:
        if self.store is not None:
            return self.store
        import uvicorn
        from fastapi import FastAPI

        self.store = SessionStore(client, tokenizer, params, client_sampling=False)
        app = FastAPI()
        app.include_router(session_router(self.store))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
            if self._task.done():
                self._task.result()  # raises what stopped it
            await asyncio.sleep(0.01)
        return self.store

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await self._task
            self._server, self.store = None, None
