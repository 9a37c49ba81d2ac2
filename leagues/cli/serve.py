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
- `--fronts N` (N > 1): this process starts the engine process and N front processes and watches them (a signal,
  or a front that exits, stops all); each front has its own link to the engine and its own `SO_REUSEPORT` socket
  on the port, and the fronts count into one set of metrics files (`leagues.serve.metrics`). A front whose
  watcher (this process) is gone stops itself.
- Agent sessions (`POST /sessions`, `/sessions/{id}/v1/chat/completions`, `/sessions/{id}/close`,
  `leagues.serve.sessions`) are mounted beside the APIs when the chat template is append-only.
"""

import asyncio
import contextlib
import os
import shutil
import socket
import sys
import threading
from dataclasses import dataclass, field
from functools import partial
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
    fronts: int = 1
    """HTTP front processes over the one engine process (needs engine_process): each parses, tokenizes,
    detokenizes and streams the connections it accepts from the shared port, so streaming clients get more than
    one core of front work. /metrics sums every front's counts; agent sessions (/sessions) need one front."""
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
        if self.fronts < 1:
            raise ValueError(f"fronts: must be at least 1, got {self.fronts}")
        if self.fronts > 1 and not self.engine_process:
            raise ValueError("fronts: several fronts share an engine process; drop --engine_process false")


def run_serve(cfg: ServeConfig) -> int:
    from leagues.engine import Engine

    api_key = cfg.api_key or os.environ.get("LEAGUES_API_KEY") or None
    admin_key = cfg.admin_key or os.environ.get("LEAGUES_ADMIN_KEY") or None
    _check_exposure(cfg, api_key, admin_key)
    if cfg.weights_root is not None and not Path(cfg.weights_root).is_dir():
        raise UsageError(f"weights_root: {cfg.weights_root} is not a directory")
    path = resolve_model_dir(cfg.model)
    sock = _bind(cfg.host, cfg.port, reuse_port=cfg.fronts > 1)
    host, port = sock.getsockname()[:2]
    url = f"http://{_url_host(host)}:{port}"
    if cfg.fronts > 1:
        return _run_fronts(cfg, path, sock, url, (api_key, admin_key))  # `sock` holds the port while they start
    try:
        engine = EngineProcess(path, cfg.engine) if cfg.engine_process else Engine(path, config=cfg.engine)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        _serve_front(
            cfg, engine, sock, (api_key, admin_key), partial(print, f"leagues serve: listening on {url}", flush=True)
        )
    finally:
        engine.close()
    return 0


def _serve_front(cfg: ServeConfig, engine, sock: socket.socket, keys: tuple, on_started) -> None:
    """One HTTP front: the app over `engine` on `sock` until uvicorn stops (a signal); `on_started` once it serves."""
    import uvicorn

    from leagues.serve.server import create_app

    app = create_app(
        engine,
        api_key=keys[0],
        admin_key=keys[1],
        limits=cfg.limits,
        weights_root=cfg.weights_root,
        served_model_name=cfg.served_model_name,
        stream_interval=cfg.stream_interval,
        fronts=cfg.fronts,
    )
    _mount_sessions(app, cfg.fronts)
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, timeout_graceful_shutdown=5))
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(_serve(server, sock, on_started))


# --- several fronts ----------------------------------------------------------------------------------------


def _run_fronts(cfg: ServeConfig, path: Path, sock: socket.socket, url: str, keys: tuple) -> int:
    """`--fronts N`: this process starts the engine process and N front processes, each with its own link to
    the engine and its own socket on the port (`SO_REUSEPORT`: the kernel spreads connections evenly over them;
    one shared listening socket would hand most to whichever front waits longest), then watches them: a signal
    or a front that exits stops them all. Their metrics go to one directory (`metrics.py`)."""
    import multiprocessing
    import signal
    import tempfile
    from multiprocessing.connection import wait

    metrics_dir = tempfile.mkdtemp(prefix="leagues-serve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before the fronts start: they read it at import
    context = multiprocessing.get_context("spawn")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        engine = EngineProcess(path, cfg.engine, links=cfg.fronts)
    except ValueError as e:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        raise UsageError(str(e)) from None
    if stop.is_set():  # stopped while the engine loaded
        engine.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        return 0
    lifeline, held = context.Pipe(duplex=False)  # a front whose reading end sees EOF stops: this process is gone
    started = [context.Event() for _ in range(cfg.fronts)]
    fronts = [
        context.Process(
            target=_front_main,
            args=(cfg, link, sock.getsockname()[:2], keys, lifeline, ready),
            name=f"leagues-front-{i}",
        )
        for i, (link, ready) in enumerate(zip(engine.links, started, strict=True))
    ]
    code = 0
    try:
        for front in fronts:
            front.start()
        for link in engine.links:
            link.close()  # the fronts hold them now: a front that dies closes its link, and the engine aborts its work
        lifeline.close()
        sentinels, gone = [front.sentinel for front in fronts], []
        while not stop.is_set() and not all(e.is_set() for e in started) and not gone:
            gone = wait(sentinels, timeout=0.1)
        sock.close()  # never listening, it only held the port until the fronts bound theirs
        if not gone and all(e.is_set() for e in started):
            print(f"leagues serve: listening on {url} ({cfg.fronts} fronts)", flush=True)
        while not stop.is_set() and not gone:
            gone = wait(sentinels, timeout=0.2)
        if gone and not stop.is_set():
            front = fronts[sentinels.index(gone[0])]
            front.join(timeout=10)  # its sentinel closes as it exits, a moment before its exit code is there
            print(f"leagues serve: {front.name} exited (code {front.exitcode}); stopping", file=sys.stderr)
            code = 1
    finally:
        for front in fronts:
            if front.is_alive():
                front.terminate()  # uvicorn's graceful shutdown
        for front in fronts:
            front.join(timeout=15)
            if front.is_alive():
                front.kill()
                front.join()
        held.close()
        engine.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code


def _front_main(cfg: ServeConfig, link, address: tuple, keys: tuple, lifeline, started) -> None:
    """A front process of `--fronts N`: an `EngineLink` over `link` and the app on a socket of its own on `address`
    (host, port), beside the other fronts'."""
    import signal

    from leagues.serve.engine_process import EngineLink

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the supervisor stops the fronts

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            lifeline.recv()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="leagues-front-lifeline", daemon=True).start()
    engine = EngineLink.attach(link)
    try:
        _serve_front(cfg, engine, _bind(*address, reuse_port=True), keys, started.set)
    finally:
        engine.close()


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


def _mount_sessions(app, fronts: int = 1) -> None:
    """Agent sessions (`/sessions`, `leagues.serve.sessions`) when the model's chat template can be bridged: within
    the server's `limits.max_sessions`, refused while the engine sleeps, their turns in the server's requests in
    flight. With several fronts the routes answer 501: a session lives in one front, and its next request may
    reach another."""
    from leagues.agent.ledger import LedgerError
    from leagues.serve.sessions import ServedClient, SessionStore, session_router

    state = app.state.leagues
    engine = state.engine
    if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
        return
    if fronts > 1:
        app.add_api_route("/sessions", _no_sessions, methods=["POST"])
        app.add_api_route("/sessions/{rest:path}", _no_sessions, methods=["POST"])
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


async def _no_sessions():
    from leagues.serve.api_common import error_response

    message = "agent sessions need one HTTP front: this server runs several (leagues serve --fronts 1 serves them)"
    return error_response(501, message, "server_error")


def _bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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


async def _serve(server, sock: socket.socket, on_started) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        on_started()
    await task
