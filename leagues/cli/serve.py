"""`leagues serve`: one model behind SGLang's native API and OpenAI's API (see `leagues.serve.server`).

    leagues serve --model DIR [--host 127.0.0.1] [--port 30000] [--api_key K] [--admin_key K] [--weights_root DIR]
                  [--limits.FIELD V] [--engine.FIELD V]

Decisions:
- Binds loopback by default: exposing the server is a choice (`--host 0.0.0.0`), and it needs both keys
  (`--api_key`, `--admin_key`) unless `--insecure` says the network is trusted; without `--weights_root`
  it warns that `/update_weights_from_disk` may read any directory. Keys may also come from
  `LEAGUES_API_KEY` / `LEAGUES_ADMIN_KEY`, which keeps them out of the process list (a key given as an
  option also lands in `--dump-config` files).
- The socket is bound before uvicorn starts, so `--port 0` picks a free port, and the line
  `leagues serve: listening on http://HOST:PORT` is printed (flushed) once the app has started and the
  engine loop runs: scripts and tests wait for that line.
- Engine knobs are the `EngineConfig` fields, under `--engine.` (`--engine.num_blocks 512`); what one
  request may ask (body bytes, sequences, tokens) and the server's own waits are `ServerLimits` fields,
  under `--limits.`.
- The default port is SGLang's (30000), so SGLang clients' defaults reach it.
- The engine runs in a process of its own by default (`leagues.serve.engine_process`): the front's per-token
  work (SSE, detokenizing) and the engine's host work then run at the same time instead of taking turns for
  one GIL. uvicorn reads and writes HTTP with httptools (a dependency: cheaper a streamed chunk than h11); the
  event loop is uvloop's where it is installed, and the interpreter hands the GIL between threads every 0.5 ms
  instead of 5 (with `--engine_process false` the engine's loop thread then waits less for the event loop's
  bursts).
- Agent sessions (`POST /sessions`, `/sessions/{id}/v1/chat/completions`, `/sessions/{id}/close`,
  `leagues.serve.sessions`) are mounted beside the APIs when the chat template is append-only.
"""

import asyncio
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from leagues.cli import LOOPBACK, UsageError
from leagues.cli.generate import resolve_model_dir
from leagues.engine.engine import EngineConfig
from leagues.serve.engine_process import SWITCH_INTERVAL_S, EngineProcess
from leagues.serve.protocol import ServerLimits


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
    """Bearer key the routes that change weights, memory, the cache or other users' requests require
    (default: $LEAGUES_ADMIN_KEY, else none: those routes take the API key)."""
    insecure: bool = False
    """Allow binding beyond loopback without both keys (a network where every peer is trusted)."""
    weights_root: str | None = None
    """Directory `/update_weights_from_disk` may load checkpoints from (anything under it; default: anywhere)."""
    served_model_name: str | None = None
    """Model name in the OpenAI API (default: the checkpoint directory's name)."""
    log_level: str = "warning"
    """uvicorn's log level."""
    engine_process: bool = True
    """Run the engine in a process of its own, so the HTTP front and the engine never wait for each other's GIL;
    false: on a thread of the server's process."""
    stream_interval: int = 1
    """Tokens a streamed output gathers before the server sends them (SGLang's `--stream-interval`): a chunk of
    `/generate` and `/v1/...` streams every N tokens of an output, and its last at its end. Larger costs the
    front less a token (fewer chunks to build and write) and gives the client its text in coarser steps."""
    limits: ServerLimits = field(default_factory=ServerLimits)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: must be in 0..65535, got {self.port}")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval: must be at least 1 token, got {self.stream_interval}")


def run_serve(cfg: ServeConfig) -> int:
    import uvicorn

    from leagues.engine import Engine
    from leagues.serve.server import create_app

    api_key = cfg.api_key or os.environ.get("LEAGUES_API_KEY") or None
    admin_key = cfg.admin_key or os.environ.get("LEAGUES_ADMIN_KEY") or None
    _check_exposure(cfg, api_key, admin_key)
    if cfg.weights_root is not None and not Path(cfg.weights_root).is_dir():
        raise UsageError(f"weights_root: {cfg.weights_root} is not a directory")
    path = resolve_model_dir(cfg.model)
    sock = _bind(cfg.host, cfg.port)
    try:
        engine = EngineProcess(path, cfg.engine) if cfg.engine_process else Engine(path, config=cfg.engine)
    except ValueError as e:
        raise UsageError(str(e)) from None
    app = create_app(
        engine,
        api_key=api_key,
        admin_key=admin_key,
        limits=cfg.limits,
        weights_root=cfg.weights_root,
        served_model_name=cfg.served_model_name,
        stream_interval=cfg.stream_interval,
    )
    _mount_sessions(app)
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, timeout_graceful_shutdown=5))
    host, port = sock.getsockname()[:2]
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(_serve(server, sock, f"http://{_url_host(host)}:{port}"))
    finally:
        engine.close()
    return 0


def _check_exposure(cfg: ServeConfig, api_key: str | None, admin_key: str | None) -> None:
    """Beyond loopback, both keys (or `--insecure`); say what stays open."""
    if cfg.host in LOOPBACK:
        return
    missing = [name for name, key in (("--api_key", api_key), ("--admin_key", admin_key)) if key is None]
    if missing and not cfg.insecure:
        raise UsageError(
            f"host {cfg.host} is not loopback and {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'}"
            " not set: anyone who reaches the port could generate, abort, or load weights; set the keys"
            " (or $LEAGUES_API_KEY / $LEAGUES_ADMIN_KEY), or pass --insecure on a trusted network"
        )
    if missing:
        print(f"leagues serve: warning: {cfg.host} is not loopback and {', '.join(missing)} unset", file=sys.stderr)
    if cfg.weights_root is None:
        warning = "no --weights_root: /update_weights_from_disk may read any directory"
        print(f"leagues serve: warning: {warning}", file=sys.stderr)


def _mount_sessions(app) -> None:
    """Agent sessions (`/sessions`, `leagues.serve.sessions`) when the model's chat template can be bridged: within
    the server's `limits.max_sessions`, refused while the engine sleeps, their turns in the server's requests in
    flight."""
    from leagues.agent.ledger import LedgerError
    from leagues.serve.sessions import ServedClient, SessionStore, session_router

    state = app.state.leagues
    engine = state.engine
    if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
        return
    client = ServedClient(engine, state.in_flight)
    try:
        store = SessionStore(
            client, engine.tokenizer, max_sessions=state.limits.max_sessions, asleep=lambda: engine.asleep
        )
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


def event_loop_factory():
    """uvloop's event loop where it is installed, else None (asyncio's own)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(server, sock: socket.socket, url: str) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(f"leagues serve: listening on {url}", flush=True)
    await task
