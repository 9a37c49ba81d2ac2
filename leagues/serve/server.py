"""The HTTP server in front of the rollout engine: SGLang's native API, OpenAI's API and Prometheus metrics.

    app = create_app(engine, api_key="k", admin_key="a")   # a FastAPI app; `leagues serve` runs it with uvicorn

Where it sits: the HTTP front (`leagues.serve`), apart from the engine core (`leagues.engine`), which never
imports it. The engine is an `Engine` of this process (on its own loop thread) or an `EngineProcess` (in a
process of its own, `leagues serve`'s default; `engine_process.py` says why); handlers call `engine.submit`
and await the futures, so every HTTP request joins the same continuous batch. The
routes live in `api_sglang.py` (`/generate`), `api_openai.py` (`/v1/...`) and `api_admin.py` (health,
info, cache, abort, weights, memory); bodies are parsed by the models of `protocol.py`. This file holds
the app and its middleware; `api_common.py` what the routes share: errors, the server's state, and
`Batch`, one HTTP request's engine requests.

Decisions:
- Errors use OpenAI's shape everywhere, `{"error": {"message", "type", "param", "code"}}` (SGLang's
  native errors are `{"error": {"message"}}`, a subset). Schema violations are 422 with `param` naming
  the field (dotted, `sampling_params.temperature`); engine `ValueError`s (prompt too long, token id out
  of the vocabulary, duplicate rid) are 400; 5xx is left for real server faults.
- Security: with `api_key`, every route but `/health` needs `Authorization: Bearer <key>` (401); with
  `admin_key`, every route that changes weights, memory, the cache or other users' requests needs it
  (403 for the plain key, 401 for none or another): the weight and memory routes, `/flush_cache`, and
  `/abort_request` with `abort_all`; the admin key also opens every other route. The middleware finds out
  who calls; the admin routes say themselves that they are admin work (`api_admin.admin`, one check:
  `api_admin.require_admin`), so no list of paths has to agree with them. Request ids the server
  makes are random, so no client can guess another's to abort it. Keys are compared in constant time.
  `weights_root` confines `/update_weights_from_disk`. Nothing received is unpickled or executed:
  weights come from safetensors files or (elsewhere) NCCL.
- Limits (`protocol.ServerLimits`): bodies are capped at `max_request_bytes` (413), counted as they
  arrive, whatever Content-Length says, and read only once the caller's key is checked; one request starts
  at most `max_request_sequences` sequences (prompts x n) and asks for at most `max_request_tokens` tokens
  (400 beyond). Bodies over `api_common.OFF_LOOP_BYTES` are tokenized in a worker thread, so a long text
  does not stall the other clients' streams.
- No client can stop the engine's loop thread: futures a caller gave up on are settled quietly, a
  stream listener that raises is dropped, and a message that fails fails only its sender.
- A request whose client goes away is aborted in the engine, streaming or not: `BodyLimitMiddleware`
  watches the connection while the handler runs and cancels it on disconnect (counted as status 499).
- A sleeping engine is not ready: `/health` answers 503 (so routers stop sending it traffic) and
  generation routes answer 503 at once rather than wait for a wake; requests already in flight pause
  and resume with the engine.
- Middleware is plain ASGI (not `BaseHTTPMiddleware`), so streamed responses are not buffered.
- Streaming: `on_token` runs for every sampled token on the thread that delivers it (the engine's loop thread,
  or the thread receiving from the engine's process); `Batch` hands tokens to the event loop in bursts
  (`api_common.Mailbox`) into each streaming request's inbox. The same callback timestamps
  tokens for the latency histograms, so metrics cost one callback per token, streamed or not.
"""

import asyncio
import contextlib
import hmac
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from leagues.engine.engine import Engine
from leagues.serve import api_admin, api_openai, api_sglang
from leagues.serve.api_common import (
    ASK_FOR_KEY,
    UNAUTHORIZED,
    APIError,
    Caller,
    ServerState,
    error_body,
    error_response,
)
from leagues.serve.engine_process import EngineProcess, InProcess
from leagues.serve.metrics import ServerMetrics
from leagues.serve.protocol import ServerLimits

OPEN_PATHS = frozenset({"/health"})


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
    """Who is calling: every route but /health needs the API key, if the server has one (401); the caller is then
    recorded in `scope["leagues_caller"]` for the admin routes' own check (`api_admin.require_admin`)."""

    def __init__(self, app, api_key: str | None, admin_key: str | None) -> None:
        self.app, self.api_key, self.admin_key = app, api_key, admin_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        token = _bearer(scope)
        if self.admin_key is not None and _same(token, self.admin_key):
            caller = Caller.ADMIN  # the admin key opens every route
        elif self.api_key is not None and not _same(token, self.api_key):
            caller = None
        elif self.admin_key is None:
            caller = Caller.ADMIN  # no admin key: admin work is anyone's who may call at all
        else:
            caller = Caller.USER if self.api_key is not None else Caller.ANONYMOUS
        if caller is None:
            headers = [(k.lower().encode(), v.encode()) for k, v in ASK_FOR_KEY.items()]
            return await _send_error(send, 401, UNAUTHORIZED, "authentication_error", headers)
        scope["leagues_caller"] = caller
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads the whole body up front, refusing it (413) as soon as it passes `max_bytes`; then runs the app
    while watching the connection: a client that goes away cancels its handler (which aborts its engine
    requests), streaming or not, and the request is counted with status 499."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope["leagues_disconnected"] = True
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                limit = f"request body is larger than {self.max_bytes} bytes"
                return await _send_error(send, 413, limit, "invalid_request_error")
        scope["leagues_body_bytes"] = size  # the routes tokenize large bodies off the event loop
        await _run_watched(self.app, scope, b"".join(chunks), receive, send)


async def _run_watched(app, scope, body: bytes, receive, send) -> None:
    """`app` with `body` replayed; it is cancelled if the client disconnects before it returns."""
    gone, replayed = asyncio.Event(), False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()  # the app's own disconnect listeners (streaming responses) wake with ours
        return {"type": "http.disconnect"}

    handler = asyncio.ensure_future(app(scope, replay, send))

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        scope["leagues_disconnected"] = True
        gone.set()
        handler.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await handler
    except asyncio.CancelledError:
        if not gone.is_set():
            raise  # cancelled from outside (shutdown), not by the client leaving
    finally:
        watcher.cancel()


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
            if scope.get("leagues_disconnected") and status[0] == 500:
                status[0] = 499  # the client left before an answer (nginx's code)
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
    return error_response(exc.status, exc.message, exc.kind, exc.param, exc.headers)


async def _on_value_error(request: Request, exc: ValueError):
    return error_response(400, str(exc))


async def _on_http_error(request: Request, exc: StarletteHTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, str(exc.detail), kind)


async def _on_unexpected(request: Request, exc: Exception):
    return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")


# --- the app ----------------------------------------------------------------------------------------


def create_app(
    engine: Engine | EngineProcess,
    *,
    api_key: str | None = None,
    admin_key: str | None = None,
    limits: ServerLimits | None = None,
    weights_root: str | Path | None = None,
    served_model_name: str | None = None,
    stream_interval: int = 1,
    fronts: int = 1,
) -> FastAPI:
    """The server's FastAPI app around a running (or lazily started) engine, of this process or its own;
    `weights_root`: the directory `/update_weights_from_disk` may load from (None: anywhere); `stream_interval`:
    the tokens a streamed output gathers before they are sent (`ServerState.stream_interval`); `fronts`: how many
    front processes serve the same engine (`/get_server_info` says)."""
    engine = InProcess(engine) if isinstance(engine, Engine) else engine
    path = str(engine.model_path) if engine.model_path is not None else ""
    metrics = ServerMetrics()
    limits = limits or ServerLimits()
    app = FastAPI(title="leagues engine", version="0.1.0", lifespan=_lifespan)
    name = served_model_name or Path(path).name or "leagues"
    root = Path(weights_root) if weights_root is not None else None
    app.state.leagues = ServerState(
        engine, metrics, path, name, limits=limits, weights_root=root, stream_interval=stream_interval, fronts=fronts
    )
    routers = (api_sglang.router, api_openai.router, api_admin.router, api_admin.admin)
    for router in routers:
        app.include_router(router)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(ValueError, _on_value_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    # The last added runs first: metrics, then the key check, then the body is read (none is buffered for a
    # caller without a key).
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_request_bytes)
    app.add_middleware(AuthMiddleware, api_key=api_key, admin_key=admin_key)
    paths = {route.path for router in routers for route in router.routes}
    app.add_middleware(MetricsMiddleware, metrics=metrics, paths=paths)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    engine = app.state.leagues.engine
    await asyncio.to_thread(engine.flush_cache)  # starts the engine's loop thread, so /health can see it
    yield
