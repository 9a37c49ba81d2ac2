"""Agent sessions: an agent that speaks OpenAI's chat API records token-exact turns into a ledger.

    POST /sessions                               {"seed": 7}                  -> {"id": "s-..."}
    POST /sessions/{id}/v1/chat/completions      OpenAI chat body (tools too) -> OpenAI chat answer
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
- A turn that stops on its token limit ends the session's sampling (a later request is refused, 400);
  `close` gives the trajectory as a `Sample` with its termination.
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
from dataclasses import dataclass, field, replace

from leagues.agent.env import assistant_message
from leagues.agent.ledger import Ledger, Termination
from leagues.agent.multi_turn import turn_seed
from leagues.agent.render import ChatRender
from leagues.agent.tool_calls import parse_tool_calls
from leagues.engine.client import EngineClient
from leagues.types import FinishReason, Sample, SamplingParams


class SessionError(ValueError):
    """A request the session cannot take (the HTTP routes answer 400 with its message)."""


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
    if message.get("tool_call_id") is not None:
        out["tool_call_id"] = message["tool_call_id"]
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {"id": c.get("id"), "type": "function",
             "function": {"name": c["function"]["name"], "arguments": _decoded(c["function"].get("arguments"))}}
            for c in message["tool_calls"]
        ]  # fmt: skip
    return out


class SessionStore:
    """The sessions of one engine client and tokenizer."""

    def __init__(
        self, client: EngineClient, tokenizer, params: SamplingParams | None = None, client_sampling: bool = True
    ) -> None:
        self.client, self.render, self.parser = client, ChatRender(tokenizer), "hermes"
        self.params = params or SamplingParams()
        """Sampling defaults (temperature, top-p, max tokens)."""
        self.client_sampling = client_sampling
        """A request's temperature and top-p replace the defaults; False (training): the run's settings hold, so
        the trainer's temperature is the one that sampled, and a request's max tokens can only lower the limit."""
        self.sessions: dict[str, Session] = {}

    def create(self, seed: int | None = None, params: SamplingParams | None = None) -> Session:
        seed = secrets.randbelow(2**31) if seed is None else seed
        session = Session(id="s-" + secrets.token_hex(8), seed=seed, params=params)
        self.sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        if session_id not in self.sessions:
            raise KeyError(f"no session {session_id!r}")
        return self.sessions[session_id]

    async def chat(self, session_id: str, body: dict) -> dict:
        """One chat completion in the session; the answer in OpenAI's shape."""
        session = self.get(session_id)
        if session.termination is not None:
            raise SessionError(f"session {session_id}: sampling ended ({session.termination}); close it")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise SessionError("messages: a non-empty list of message objects")
        self._extend(session, messages, body.get("tools") or None)
        out = await self._sample(session, body)
        text = out.text
        calls, errors = parse_tool_calls(text, self.parser) if body.get("tools") else ([], [])
        answer = _answer(session, assistant_message(text, calls, errors, session.turn - 1), calls, out)
        session.messages.append(_template_input(answer["choices"][0]["message"]))  # what the agent will repeat
        return answer

    def _extend(self, session: Session, messages: list[dict], tools) -> None:
        """Match the request's history against the session and append what is new to the ledger."""
        if session.ledger is None:
            session.ledger = Ledger(self.render.prompt([_template_input(m) for m in messages], tools))
            session.messages = [_template_input(m) for m in messages]
            return
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
        session.ledger.append_context((self.render.stop_ids if session.unclosed else []) + self.render.bridge(new))
        session.messages += new

    async def _sample(self, session: Session, body: dict):
        ledger = session.ledger
        request = list(ledger.token_ids)
        ledger.check_request(request)
        defaults = session.params or self.params
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or defaults.max_new_tokens
        params = replace(defaults, n=1, seed=turn_seed(session.seed, session.turn), ignore_eos=False,
                         routed_experts_start=ledger.routes_start)  # fmt: skip
        try:
            if self.client_sampling:
                params = replace(params, max_new_tokens=int(limit),
                                 temperature=float(body.get("temperature", params.temperature)),
                                 top_p=float(body.get("top_p", params.top_p)))  # fmt: skip
            else:
                params = replace(params, max_new_tokens=min(int(limit), params.max_new_tokens))
        except (TypeError, ValueError) as e:
            raise SessionError(f"sampling: {e}") from None
        out = (await self.client.generate(request, params))[0]
        ledger.append_sampled(out.token_ids, out.logprobs, out.weight_version)
        if out.routed_experts is not None and out.finish_reason != FinishReason.ABORT:
            ledger.add_routes(out.routed_experts)
        session.turn += 1
        if out.finish_reason == FinishReason.LENGTH:
            session.termination = Termination.LENGTH
        elif out.finish_reason == FinishReason.ABORT:
            session.termination = Termination.ABORT
        # a stop string or token other than the model's: the next bridge closes the turn as the template does
        session.unclosed = out.token_ids[-1:] != self.render.stop_ids[-1:]
        return out

    def close(self, session_id: str, reward: float | None = None) -> Sample:
        """The session's trajectory as one `Sample` (reward in `metadata["env_reward"]`); the session ends."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            raise KeyError(f"no session {session_id!r}")
        if session.ledger is None:
            raise SessionError(f"session {session_id}: closed before any chat completion")
        termination = session.termination or Termination.DONE
        sample = session.ledger.to_sample(termination)
        final = next((m for m in reversed(session.messages) if m["role"] == "assistant"), {})
        sample.metadata |= {"messages": session.messages, "response_text": final.get("content", ""),
                            "env_reward": reward, "turn_rewards": [], "env_info": {}}  # fmt: skip
        return sample


def _answer(session: Session, message: dict, calls: list, out) -> dict:
    content = message["content"]
    reply = {"role": "assistant", "content": content}
    finish = str(out.finish_reason)
    if calls:
        reply["content"] = content[: content.find("<tool_call>")] or None
        reply["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in message["tool_calls"]]
        finish = "tool_calls" if finish == "stop" else finish
    usage = {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.token_ids)}
    return {
        "id": f"{session.id}-{session.turn}",
        "object": "chat.completion",
        "model": "leagues-session",
        "choices": [{"index": 0, "message": reply, "finish_reason": finish, "logprobs": None}],
        "usage": usage | {"total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
    }


def session_router(store: SessionStore):
    """The session routes over `store`, as a FastAPI router (mounted by `leagues serve` and by agent runs)."""
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse

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
            if body.get("stream"):
                raise SessionError("stream: sessions answer whole messages (stream false)")
            return await store.chat(session_id, body)

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
