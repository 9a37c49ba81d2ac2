"""`leagues serve`: one model behind SGLang's native API and OpenAI's API (see `leagues.engine.server`).

    leagues serve --model DIR [--host 127.0.0.1] [--port 30000] [--api_key K] [--admin_key K] [--engine.FIELD V]

Decisions:
- Binds loopback by default: exposing the server is a choice (`--host 0.0.0.0`), and doing so without an
  API key prints a warning. Keys may also come from `LEAGUES_API_KEY` / `LEAGUES_ADMIN_KEY`, which keeps
  them out of the process list (a key given as an option also lands in `--dump-config` files).
- The socket is bound before uvicorn starts, so `--port 0` picks a free port, and the line
  `leagues serve: listening on http://HOST:PORT` is printed (flushed) once the app has started and the
  engine loop runs: scripts and tests wait for that line.
- Engine knobs are the `EngineConfig` fields, under `--engine.` (`--engine.num_blocks 512`).
- The default port is SGLang's (30000), so SGLang clients' defaults reach it.
- Agent sessions (`POST /sessions`, `/sessions/{id}/v1/chat/completions`, `/sessions/{id}/close`,
  `leagues.agent.sessions`) are mounted beside the APIs when the chat template is append-only.
"""

import asyncio
import os
import socket
import sys
from dataclasses import dataclass, field

from leagues.cli import UsageError
from leagues.cli.generate import resolve_model_dir
from leagues.engine.client import DEFAULT_MAX_REQUEST_BYTES
from leagues.engine.engine import EngineConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(kw_only=True, slots=True)
class ServeConfig:
    """Serve a model over HTTP."""

    model: str = "tiny-moe"
    """Checkpoint directory in HF format, or the name of a built-in model (`tiny-moe`)."""
    host: str = "127.0.0.1"
    """Address to bind; loopback by default."""
    port: int = 30000
    """Port to bind; 0 picks a free one (the listening line says which)."""
    api_key: str | None = None
    """Bearer key every route but /health requires (default: $LEAGUES_API_KEY, else none)."""
    admin_key: str | None = None
    """Bearer key the weight and memory routes require (default: $LEAGUES_ADMIN_KEY, else none)."""
    served_model_name: str | None = None
    """Model name in the OpenAI API (default: the checkpoint directory's name)."""
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    """Largest request body accepted (larger ones get 413)."""
    log_level: str = "warning"
    """uvicorn's log level."""
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: must be in 0..65535, got {self.port}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes: must be positive, got {self.max_request_bytes}")


def run_serve(cfg: ServeConfig) -> int:
    import uvicorn

    from leagues.engine import Engine
    from leagues.engine.server import create_app

    api_key = cfg.api_key or os.environ.get("LEAGUES_API_KEY") or None
    admin_key = cfg.admin_key or os.environ.get("LEAGUES_ADMIN_KEY") or None
    if cfg.host not in LOOPBACK and api_key is None:
        print(f"leagues serve: warning: {cfg.host} is not loopback and no API key is set", file=sys.stderr)
    path = resolve_model_dir(cfg.model)
    sock = _bind(cfg.host, cfg.port)
    try:
        engine = Engine(path, config=cfg.engine)
    except ValueError as e:
        raise UsageError(str(e)) from None
    app = create_app(
        engine,
        api_key=api_key,
        admin_key=admin_key,
        max_request_bytes=cfg.max_request_bytes,
        served_model_name=cfg.served_model_name,
    )
    _mount_sessions(app, engine)
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, timeout_graceful_shutdown=5))
    host, port = sock.getsockname()[:2]
    try:
        asyncio.run(_serve(server, sock, f"http://{_url_host(host)}:{port}"))
    finally:
        engine.close()
    return 0


def _mount_sessions(app, engine) -> None:
    """Agent sessions (`/sessions`, `leagues.agent.sessions`) when the model's chat template can be bridged."""
    from leagues.agent.ledger import LedgerError
    from leagues.agent.sessions import SessionStore, session_router
    from leagues.engine.client import LocalClient

    if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
        return
    try:
        store = SessionStore(LocalClient(engine), engine.tokenizer)
    except LedgerError as e:  # a template that is not append-only cannot record sessions
        print(f"leagues serve: no agent sessions: {e}", file=sys.stderr)
        return
    app.include_router(session_router(store))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot bind {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _serve(server, sock: socket.socket, url: str) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(f"leagues serve: listening on {url}", flush=True)
    await task
