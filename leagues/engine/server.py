"""The HTTP server of the rollout engine: SGLang's native API, OpenAI's API and Prometheus metrics.

    app = create_app(engine, api_key="k", admin_key="a")   # a FastAPI app; `leagues serve` runs it with uvicorn

Where it sits: the engine runs in the server process, on its own loop thread; handlers call
`engine.submit` and await the futures, so every HTTP request joins the same continuous batch. The
routes live in `api_sglang.py` (`/generate`), `api_openai.py` (`/v1/...`) and `api_admin.py` (health,
info, cache, abort, weights, memory); bodies are parsed by the models of `protocol.py`. This file holds
what they share: the app, its middleware, errors, and `Batch`, one HTTP request's engine requests.

Decisions:
- Errors use OpenAI's shape everywhere, `{"error": {"message", "type", "param", "code"}}` (SGLang's
  native errors are `{"error": {"message"}}`, a subset). Schema violations are 422 with `param` naming
  the field (dotted, `sampling_params.temperature`); engine `ValueError`s (prompt too long, token id out
  of the vocabulary, duplicate rid) are 400; 5xx is left for real server faults.
- Security: with `api_key`, every route but `/health` needs `Authorization: Bearer <key>` (401); with
  `admin_key`, the weight and memory routes need it (403 for any other key, the plain one included),
  and the admin key also opens every other route. Keys are compared in constant time. Bodies are capped
  at `max_request_bytes` (413), counted as they arrive, whatever Content-Length says. Nothing received
  is unpickled or executed: weights come from safetensors files or (elsewhere) NCCL.
- Middleware is plain ASGI (not `BaseHTTPMiddleware`), so streamed responses are not buffered.
- Streaming: the engine calls `on_token` on its thread for every sampled token; `Batch` hops each call
  onto the event loop with `call_soon_threadsafe` and an `asyncio.Queue`. The same callback timestamps
  tokens for the latency histograms, so metrics cost one callback per token, streamed or not.
- A request whose client goes away (handler cancelled, stream closed) is aborted in the engine.
"""

import asyncio
import contextlib
import hmac
import itertools
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from leagues.engine.client import DEFAULT_MAX_REQUEST_BYTES
from leagues.engine.engine import Engine
from leagues.engine.metrics import ServerMetrics
from leagues.engine.output import Output
from leagues.types import SamplingParams

OPEN_PATHS = frozenset({"/health"})
ADMIN_PATHS = frozenset(
    {
        "/update_weights_from_disk",
        "/init_weights_update_group",
        "/update_weights_from_distributed",
        "/destroy_weights_update_group",
        "/release_memory_occupation",
        "/resume_memory_occupation",
    }
)


class APIError(Exception):
    """An error answered as `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, kind: str, param: str | None = None, code: int | str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    return JSONResponse(error_body(message, kind, param, status), status_code=status)


@dataclass(slots=True)
class ServerState:
    """What the routes share: the engine, the metrics, and the requests in flight."""

    engine: Engine
    metrics: ServerMetrics
    model_path: str
    served_model_name: str
    in_flight: set[str] = field(default_factory=set)
    ids: itertools.count = field(default_factory=itertools.count)
    started: float = field(default_factory=time.time)
    weight_receiver: object | None = None
    """`remote_weights.WeightReceiver`, made by the first weight-group route."""

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self.ids)}-{int(self.started) % 100000}"


def state_of(request: Request) -> ServerState:
    return request.app.state.leagues


# --- one HTTP request's engine requests -------------------------------------------------------------


class _Tracker:
    """The engine's `on_token` for one prompt: timestamps every token and, when streaming, queues it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue | None, base: int, n: int):
        self.loop, self.queue, self.base = loop, queue, base
        self.times: list[list[float]] = [[] for _ in range(n)]

    def __call__(self, index: int, token_id: int, logprob: float) -> None:  # on the engine thread
        self.times[index].append(time.monotonic())
        if self.queue is not None:
            event = ("token", self.base + index, token_id, logprob)
            with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody is listening
                self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class Batch:
    """The engine requests of one HTTP request: one per prompt, each with `params.n` samples.

    Outputs are indexed prompt-major: output `i * n + j` is sample `j` of prompt `i`. `field` names the
    request field that holds the prompts, for errors.
    """

    def __init__(
        self, state: ServerState, prompts: list, params: SamplingParams, rids: list[str], stream: bool, field: str
    ):
        self.state, self.params, self.rids = state, params, rids
        self.start = time.monotonic()
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue | None = asyncio.Queue() if stream else None
        self.trackers = [_Tracker(loop, self.queue, i * params.n, params.n) for i in range(len(prompts))]
        self.futures: list[Future] = []
        try:
            for prompt, rid, tracker in zip(prompts, rids, self.trackers, strict=True):
                self.futures.append(state.engine.submit(prompt, params, rid, tracker))
                state.in_flight.add(rid)
        except ValueError as err:  # the engine's checks of the prompt and the params: name the field
            self.abort()
            raise APIError(400, f"{field}: {err}", param=field) from None
        except BaseException:
            self.abort()
            raise
        self.waiters = [asyncio.wrap_future(f) for f in self.futures]
        if self.queue is not None:
            for i, waiter in enumerate(self.waiters):
                waiter.add_done_callback(lambda w, i=i: self.queue.put_nowait(("done", i, w)))

    def abort(self) -> None:
        for rid, future in zip(self.rids, self.futures, strict=False):
            if not future.done():
                self.state.engine.abort(rid)
        self._forget()

    def _forget(self) -> None:
        for rid in self.rids:
            self.state.in_flight.discard(rid)

    async def results(self) -> list[Output]:
        """Every output, prompt-major; cancelling the caller aborts the engine requests."""
        try:
            per_prompt = await asyncio.gather(*self.waiters)
        except BaseException:
            self.abort()
            raise
        return self._finish(per_prompt)

    def _finish(self, per_prompt: list[list[Output]]) -> list[Output]:
        self._forget()
        end = time.monotonic()
        metrics = self.state.metrics
        outputs = [o for outs in per_prompt for o in outs]
        for tracker, outs in zip(self.trackers, per_prompt, strict=True):
            metrics.prompt_tokens.inc(len(outs[0].prompt_token_ids))
            for o in outs:
                metrics.observe_sample(self.start, tracker.times[o.index], end)
        for o in outputs:
            metrics.generated_tokens.inc(len(o.token_ids))
            metrics.finished.labels(finish_reason=str(o.finish_reason)).inc()
        return outputs

    async def events(self) -> AsyncIterator[tuple]:
        """`("token", index, token_id, logprob)` as tokens come, `("done", prompt_index, outputs)` per prompt."""
        assert self.queue is not None, "events() needs stream=True"
        done: dict[int, list[Output]] = {}
        try:
            while len(done) < len(self.waiters):
                event = await self.queue.get()
                if event[0] == "done":
                    done[event[1]] = event[2].result()  # raises the engine's error, if any
                    event = ("done", event[1], done[event[1]])
                yield event
        except BaseException:
            self.abort()
            raise
        self._finish([done[i] for i in range(len(self.waiters))])


def sse(data) -> bytes:
    """One server-sent event; `data` is JSON-encoded unless it is a string (`[DONE]`)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def finite(x: float) -> float | None:
    """JSON has no inf/nan: a non-finite logprob becomes null."""
    return x if x == x and abs(x) != float("inf") else None


# --- middleware ---------------------------------------------------------------------------------------


async def _send_error(send, status: int, message: str, kind: str, headers: list | None = None) -> None:
    body = json.dumps(error_body(message, kind, None, status)).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})


def _bearer(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode(), b.encode())


class AuthMiddleware:
    def __init__(self, app, api_key: str | None, admin_key: str | None) -> None:
        self.app, self.api_key, self.admin_key = app, api_key, admin_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        token = _bearer(scope)
        admin_ok = self.admin_key is not None and _same(token, self.admin_key)
        plain_ok = self.api_key is None or _same(token, self.api_key) or admin_ok
        if scope["path"] in ADMIN_PATHS and self.admin_key is not None and not admin_ok:
            if token is None:
                return await self._unauthorized(send)
            return await _send_error(send, 403, "this endpoint needs the admin key", "permission_error")
        if not plain_ok:
            return await self._unauthorized(send)
        return await self.app(scope, receive, send)

    async def _unauthorized(self, send) -> None:
        headers = [(b"www-authenticate", b"Bearer")]
        await _send_error(
            send, 401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error", headers
        )


class BodyLimitMiddleware:
    """Reads the whole body up front, refusing it (413) as soon as it passes `max_bytes`."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                limit = f"request body is larger than {self.max_bytes} bytes"
                return await _send_error(send, 413, limit, "invalid_request_error")
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class MetricsMiddleware:
    """Counts requests by route path (unknown paths as `other`, so labels stay bounded) and status."""

    def __init__(self, app, metrics: ServerMetrics, paths: set[str]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            endpoint = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.observe_http(endpoint, status[0])


# --- errors -----------------------------------------------------------------------------------------


def _param(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic names union arms in the location (`str`, `list[int]`, `function-after[...]`): drop them
    parts = [p for p in parts if not any(c in p for c in "[]()") and p not in ("str", "int", "float", "bool")]
    return ".".join(parts) or "body"


async def _on_validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    param = _param(first.get("loc", ()))
    return error_response(422, f"{param}: {first.get('msg')}", param=param)


async def _on_api_error(request: Request, exc: APIError):
    return error_response(exc.status, exc.message, exc.kind, exc.param)


async def _on_value_error(request: Request, exc: ValueError):
    return error_response(400, str(exc))


async def _on_http_error(request: Request, exc: StarletteHTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, str(exc.detail), kind)


async def _on_unexpected(request: Request, exc: Exception):
    return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")


# --- the app ----------------------------------------------------------------------------------------


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    admin_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    served_model_name: str | None = None,
) -> FastAPI:
    """The server's FastAPI app around a running (or lazily started) engine."""
    from leagues.engine import api_admin, api_openai, api_sglang

    path = str(engine.model_path) if engine.model_path is not None else ""
    metrics = ServerMetrics()
    app = FastAPI(title="leagues engine", version="0.1.0", lifespan=_lifespan)
    app.state.leagues = ServerState(engine, metrics, path, served_model_name or Path(path).name or "leagues")
    for module in (api_sglang, api_openai, api_admin):
        app.include_router(module.router)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(ValueError, _on_value_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_middleware(AuthMiddleware, api_key=api_key, admin_key=admin_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    paths = {route.path for module in (api_sglang, api_openai, api_admin) for route in module.router.routes}
    app.add_middleware(MetricsMiddleware, metrics=metrics, paths=paths)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    engine = app.state.leagues.engine
    await asyncio.to_thread(engine.flush_cache)  # starts the engine's loop thread, so /health can see it
    yield


class TextStream:
    """The streamed text of one sample: grows token by token, never past what the final text may keep.

    The engine cuts the final text before a matched stop string, and a token may end inside a UTF-8
    character, so the last `max(len(stop))` characters (and a trailing U+FFFD) are held back until the
    end; `finish` then sends what remains of the final text. Decoding the whole output on every token is
    quadratic in its length, which is fine for the lengths RL rollouts stream.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.holdback = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""

    def add(self, token_id: int, logprob: float) -> str:
        """Append a token; returns the new text that is safe to show (maybe empty)."""
        self.ids.append(token_id)
        self.logprobs.append(logprob)
        if self.tokenizer is None:
            return ""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end = len(full) - self.holdback - (1 if full.endswith("\ufffd") else 0)
        if end <= len(self.text):
            return ""
        delta = full[len(self.text) : end]
        self.text += delta
        return delta

    def finish(self, final_text: str) -> str:
        delta = final_text[len(self.text) :] if final_text.startswith(self.text) else ""
        self.text = final_text
        return delta
