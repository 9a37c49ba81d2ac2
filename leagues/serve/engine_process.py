"""The engine behind the HTTP front, on a thread of the server's process or in a process of its own.

    handle = InProcess(Engine(path))                     # the engine on a thread of this process
    handle = EngineProcess(path, EngineConfig())         # `leagues serve`: the engine in a child process
    handle = EngineLink.attach(conn)                     # another front's link to it (`EngineProcess(links=N)`)
    future = handle.submit(prompt_ids, params, rid, on_token)      # a concurrent Future of the n outputs

All give the routes one surface: `submit`, `abort`, `generate_async`, the blocking calls (`abort_all`,
`flush_cache`, `sleep`, `wake`, `load_from_disk`, `weight_group`), `status()` (alive, asleep, weight version,
stats, queues, cache) and what never changes (`model_path`, `tokenizer`, `max_model_len`, `config`, `family`).

Why a process of its own: in one process the event loop (HTTP parsing, SSE writes, detokenizing) and the
engine's loop thread take turns holding the GIL, so every streamed token's front work delays the next decode
step, and the more clients stream the less the engine runs (on one H200, 64 streaming clients got 34% of the
engine's in-process throughput). In its own process the engine steps while the front writes.

Decisions:
- One duplex pipe a front; messages are pickled tuples sent whole (`send_bytes`), so the CPU tensors of outputs (routes)
  travel by value and nothing is unpickled from anyone but the child this process started.
- Tokens travel in bursts: the engine's thread appends each sampled token to an outbox and a sender thread sends
  all that gathered since its last send as one message, so a decode step of 64 streaming rows is one message.
  Finishes, failures and call answers ride the same outbox, so they never overtake a request's tokens.
- Prompts are tokenized and checked in the front, against the engine's own `PromptLimits`: a bad prompt fails
  before it crosses, and tokenizing costs the engine's process nothing.
- Status comes with every message from the child (at least every 0.2 s); `fresh_status()` asks for it now.
- One engine process can serve several fronts (`leagues serve --fronts N`): each front has a pipe of its own
  (an `EngineLink`), the child serves each on a thread and sends each link's tokens and answers on that link.
  `abort_all` aborts every link's requests; a link that closes has its requests aborted.
- The child ends when the first pipe closes (the process that started it is gone, however it ended). If the
  child dies, every request and call in flight fails with its exit code, `status().alive` turns False
  (`/health`: 503), and new requests fail at once.
- Blocking calls (sleep, wake, weight loads, weight-group joins) run on worker threads of the child, so its pipe
  keeps taking requests and aborts meanwhile.
"""

import asyncio
import collections
import contextlib
import itertools
import multiprocessing
import os
import pickle
import secrets
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from leagues.engine import remote_weights
from leagues.engine.disk_weights import check_checkpoint, disk_tensors
from leagues.engine.engine import Engine, EngineConfig, checkpoint_tokenizer
from leagues.engine.output import Output
from leagues.engine.requests import TokenCallback, prompt_ids, resolve
from leagues.types import SamplingParams

SWITCH_INTERVAL_S = 0.0005
"""How long a thread of a serving process may hold the GIL while another waits for it (Python's default is 5 ms):
the front's event loop and its receiving thread take turns, and so do the engine's loop thread and the threads
that carry its requests in and its tokens out; each hand-over of a request or a token waits for a switch."""

WEIGHT_GROUP_ROUTES = frozenset(
    {"init_weights_update_group", "update_weights_from_distributed", "destroy_weights_update_group"}
)


class EngineGone(RuntimeError):
    """The engine's process has exited: what was in flight failed, and nothing sent now runs (HTTP 503)."""


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """What the front shows of a running engine (`/health`, `/get_server_info`, `/metrics`)."""

    alive: bool
    asleep: bool
    weight_version: int
    stats: dict = field(default_factory=dict)
    num_waiting: int = 0
    num_running: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0


class InProcess:
    """An `Engine` of this process behind the front's surface (the engine's loop thread shares this process)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model_path, self.tokenizer, self.config = engine.model_path, engine.tokenizer, engine.config
        self.max_model_len, self.family = engine.max_model_len, engine.model.config.family
        self._receiver: remote_weights.WeightReceiver | None = None

    def status(self) -> EngineStatus:
        engine, blocks = self.engine, self.engine.blocks
        return EngineStatus(
            alive=engine.is_alive,
            asleep=engine.asleep,
            weight_version=engine.weight_version,
            stats=dict(engine.stats),
            num_waiting=len(engine.scheduler.waiting),
            num_running=len(engine.scheduler.running),
            num_blocks=blocks.num_blocks,
            num_free_blocks=blocks.num_free_blocks,
            prefix_queries=blocks.num_prefix_queries,
            prefix_hits=blocks.num_prefix_hits,
        )

    fresh_status = status
    pid = None
    """The engine shares this process."""

    @property
    def is_alive(self) -> bool:
        return self.engine.is_alive

    @property
    def asleep(self) -> bool:
        return self.engine.asleep

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    def submit(self, prompt, params: SamplingParams, request_id: str | None = None, on_token=None) -> Future:
        return self.engine.submit(prompt, params, request_id, on_token)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def abort_all(self) -> int:
        """Abort every request the engine holds (a served engine's are the server's, whichever front sent them);
        returns how many."""
        rids = list(self.engine.requests)  # one C-level copy of the keys: safe beside the engine's thread
        for rid in rids:
            self.engine.abort(rid)
        return len(rids)

    async def generate_async(self, prompt, params=None, request_id=None, on_token=None) -> list[Output]:
        return await asyncio.wrap_future(self.submit(prompt, params or SamplingParams(), request_id, on_token))

    def flush_cache(self) -> None:
        self.engine.flush_cache()

    def sleep(self, offload_weights: bool = False) -> None:
        self.engine.sleep(offload_weights)

    def wake(self) -> None:
        self.engine.wake()

    def load_from_disk(self, path: Path, version: int | None = None, abort_all: bool = False) -> int:
        """Load a safetensors checkpoint once it is known to fit the model (a ValueError or OSError before anything
        changes if not), with `abort_all` aborting every request first; returns the number of tensors loaded."""
        files = check_checkpoint(self.engine.model, Path(path))
        if abort_all:
            self.abort_all()
        return self.engine.load_weights(disk_tensors(files), version)

    def weight_group(self, route: str, req: dict, timeout_s: float) -> dict:
        """One of `remote_weights`' routes (SGLang's NCCL weight protocol); the groups live beside the engine."""
        if route not in WEIGHT_GROUP_ROUTES:
            raise ValueError(f"unknown weight-group route {route!r}")
        if self._receiver is None:
            self._receiver = remote_weights.WeightReceiver(timeout_s)
        return getattr(remote_weights, route)(self.engine, self._receiver, req)

    def close(self) -> None:
        self.engine.close()


# --- the engine in a child process --------------------------------------------------------------------------

_CALLS = frozenset({"flush_cache", "sleep", "wake", "load_from_disk", "weight_group", "status", "abort_all"})
"""What a front may ask the child to run (`InProcess` methods)."""

_ERRORS = {"ValueError": ValueError, "OSError": OSError, "FileNotFoundError": OSError, "TimeoutError": TimeoutError}


def _error_of(err: BaseException) -> tuple[str, str]:
    return type(err).__name__, str(err)


def _rebuild(kind: str, message: str) -> Exception:
    """The child's error as the front raises it: the kinds routes tell apart keep their type."""
    return _ERRORS[kind](message) if kind in _ERRORS else RuntimeError(f"{kind}: {message}")


class EngineLink:
    """The front's end of one link to the engine's process, with `InProcess`'s surface. `EngineProcess` is the link
    of the process that started the engine; a front of `leagues serve --fronts N` takes one of its `links` with
    `EngineLink.attach`."""

    def __init__(self, conn, info: dict, proc=None) -> None:
        self._conn, self._proc = conn, proc
        self.model_path, self.config, self._pid = info["model_path"], info["config"], info["pid"]
        self.max_model_len, self.family, self.limits = info["max_model_len"], info["family"], info["limits"]
        self._status: EngineStatus = info["status"]
        self.tokenizer = checkpoint_tokenizer(Path(self.model_path))  # the engine's own choice, made the same way
        self._send_lock = threading.Lock()
        self._requests: dict[str, tuple[Future, TokenCallback | None]] = {}
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._failure: str | None = None
        self._receiver = threading.Thread(target=self._receive, name="leagues-engine-link", daemon=True)
        self._receiver.start()

    @classmethod
    def attach(cls, conn, start_timeout_s: float = 3600.0) -> "EngineLink":
        """The link over `conn`, one of an `EngineProcess`'s `links` handed to this process, once the engine says
        it is ready."""
        kind, info = _first_message(conn, None, start_timeout_s)
        if kind == "failed":
            raise _rebuild(*info)
        return cls(conn, info)

    # --- the surface ------------------------------------------------------------------------------------------

    def status(self) -> EngineStatus:
        """The latest status the child sent (at most ~0.2 s old while it runs)."""
        if self._failure is not None:
            return EngineStatus(alive=False, asleep=self._status.asleep, weight_version=self._status.weight_version)
        return self._status

    def fresh_status(self) -> EngineStatus:
        """The status now (a round trip to the child; blocking)."""
        return self._call("status")

    @property
    def is_alive(self) -> bool:
        return self.status().alive

    @property
    def pid(self) -> int | None:
        """The engine process's id (`/get_server_info`'s `engine_pid`)."""
        return self._pid

    @property
    def asleep(self) -> bool:
        return self._status.asleep

    @property
    def weight_version(self) -> int:
        return self._status.weight_version

    def submit(self, prompt, params: SamplingParams, request_id: str | None = None, on_token=None) -> Future:
        """Queue one request; the future resolves to its n outputs. `on_token` runs on this process's receiving
        thread for every sampled token; one that raises is dropped."""
        ids = prompt_ids(prompt, self.tokenizer)
        self.limits.check(ids, params)
        rid = request_id or f"req-{secrets.token_hex(8)}"
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in flight")
        future: Future = Future()
        self._requests[rid] = (future, on_token)
        try:
            self._send(("add", rid, ids, params))
        except BaseException:
            self._requests.pop(rid, None)
            raise
        return future

    def abort(self, request_id: str) -> None:
        with contextlib.suppress(RuntimeError):  # nothing to abort in an engine that is gone
            self._send(("abort", request_id))

    def abort_all(self) -> int:
        """Abort every request in the engine, whichever front sent it; returns how many (blocking)."""
        return self._call("abort_all")

    async def generate_async(self, prompt, params=None, request_id=None, on_token=None) -> list[Output]:
        return await asyncio.wrap_future(self.submit(prompt, params or SamplingParams(), request_id, on_token))

    def flush_cache(self) -> None:
        self._call("flush_cache")

    def sleep(self, offload_weights: bool = False) -> None:
        self._call("sleep", offload_weights)

    def wake(self) -> None:
        self._call("wake")

    def load_from_disk(self, path: Path, version: int | None = None, abort_all: bool = False) -> int:
        return self._call("load_from_disk", str(path), version, abort_all)

    def weight_group(self, route: str, req: dict, timeout_s: float) -> dict:
        return self._call("weight_group", route, req, timeout_s)

    def close(self) -> None:
        """Leave the engine: its requests from this link are aborted (the engine runs on for the other links)."""
        with contextlib.suppress(RuntimeError):
            self._send(("close",))
        self._conn.close()

    # --- the pipe --------------------------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        if self._failure is not None:
            raise EngineGone(self._failure)
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            try:
                self._conn.send_bytes(data)
            except OSError as err:
                raise EngineGone(f"the engine process is gone: {err}") from None

    def _call(self, name: str, *args):
        future: Future = Future()
        call_id = next(self._call_ids)
        self._calls[call_id] = future
        try:
            self._send(("call", call_id, name, args))
        except BaseException:
            self._calls.pop(call_id, None)
            raise
        return future.result()

    def _receive(self) -> None:
        """The receiving thread: the child's messages, until its end of the pipe closes."""
        reason = None
        try:
            while True:
                _, events, self._status = pickle.loads(self._conn.recv_bytes())  # status first: answers see it
                for event in events:
                    self._handle(event)
        except (EOFError, OSError):
            pass
        except Exception as err:  # a message this side cannot take: the link is lost, so is the engine
            reason = f"{type(err).__name__}: {err}"
            if self._proc is not None:
                self._proc.kill()
        if self._proc is not None:
            self._proc.join(timeout=5)
            self._failure = f"the engine process exited (code {self._proc.exitcode})"
        else:
            self._failure = "the engine process exited"
        if reason is not None:
            self._failure += f" after its link failed ({reason})"
        error = EngineGone(self._failure)
        for future, _ in list(self._requests.values()):
            resolve(future, error=error)
        for future in list(self._calls.values()):
            resolve(future, error=error)
        self._requests.clear()
        self._calls.clear()

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "token":
            _, rid, index, token_id, logprob = event
            entry = self._requests.get(rid)
            if entry is not None and entry[1] is not None:
                try:
                    entry[1](index, token_id, logprob)
                except Exception:  # a listener that raises is dropped, as the engine does
                    self._requests[rid] = (entry[0], None)
        elif kind == "done":
            entry = self._requests.pop(event[1], None)
            if entry is not None:
                resolve(entry[0], event[2])
        elif kind == "failed":
            entry = self._requests.pop(event[1], None)
            if entry is not None:
                resolve(entry[0], error=_rebuild(*event[2]))
        elif kind == "answer":
            _, call_id, ok, value = event
            future = self._calls.pop(call_id, None)
            if future is not None:
                resolve(future, value) if ok else resolve(future, error=_rebuild(*value))


class EngineProcess(EngineLink):
    """An `Engine` in a child process (spawned, so CUDA starts clean), with `InProcess`'s surface.

    `start_timeout_s` bounds loading the model and building the engine; an engine that cannot be built raises
    here (a ValueError for a bad config, as `Engine` would). `links` more links to the same engine are made for
    other processes (`self.links`, each taken by one `EngineLink.attach`); the engine ends when this object's own
    link closes, whatever the others do."""

    def __init__(
        self, model_path: str | Path, config: EngineConfig, start_timeout_s: float = 3600.0, links: int = 0
    ) -> None:
        context = multiprocessing.get_context("spawn")
        pipes = [context.Pipe() for _ in range(1 + links)]
        proc = context.Process(
            target=run_child, args=([child for _, child in pipes], str(model_path), config), name="leagues-engine"
        )
        proc.start()
        for _, child in pipes:
            child.close()
        kind, info = _first_message(pipes[0][0], proc, start_timeout_s)
        if kind == "failed":
            proc.join(timeout=10)
            raise _rebuild(*info)
        super().__init__(pipes[0][0], info, proc)
        self.links = [front for front, _ in pipes[1:]]
        """The other links' front ends, to hand to the processes that take them (and then close here)."""

    def close(self) -> None:
        """Leave the engine and wait for its process to end (this is its first link)."""
        super().close()
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)


def _first_message(conn, proc, timeout_s: float) -> tuple[str, object]:
    """The child's first message on `conn` (ready, or failed); `proc`, when this process started it, is watched."""
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.5):
        if proc is not None and not proc.is_alive():
            raise RuntimeError(f"the engine process exited while starting (code {proc.exitcode})")
        if time.monotonic() > deadline:
            if proc is not None:
                proc.kill()
            raise RuntimeError(f"the engine process did not start within {timeout_s:g} s")
    return pickle.loads(conn.recv_bytes())


class _Outbox:
    """The child's messages to the front: events gathered from any thread, sent by one thread in bursts, each with
    the engine's status. Adding one takes no lock (a deque's appends and pops are atomic): the engine's thread
    adds a token's event for every streaming row of every step."""

    def __init__(self, conn, status, period_s: float = 0.2) -> None:
        self.conn, self.status, self.period_s = conn, status, period_s
        self.items: collections.deque[tuple] = collections.deque()
        self.ready, self.closed = threading.Event(), False
        self.thread = threading.Thread(target=self._run, name="leagues-engine-outbox", daemon=True)

    def put(self, event: tuple) -> None:
        self.items.append(event)
        if not self.ready.is_set():  # the sender clears it before it drains, so nothing added waits a period
            self.ready.set()

    def send(self, kind: str, payload) -> None:
        self.conn.send_bytes(pickle.dumps((kind, payload, self.status()), protocol=pickle.HIGHEST_PROTOCOL))

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # the front is gone: the main loop sees the pipe close too
            while not self.closed:
                self.ready.wait(self.period_s)
                self.ready.clear()
                items, popleft = [], self.items.popleft
                with contextlib.suppress(IndexError):
                    while True:
                        items.append(popleft())
                self.send("events", items)

    def close(self) -> None:
        self.closed = True
        self.ready.set()
        self.thread.join(timeout=5)


def run_child(conns: list, model_path: str, config: EngineConfig) -> None:
    """The engine process: build the engine, say it is ready on every link, then serve them; it ends when the
    first link (that of the process that started it) closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the front decides when to stop
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        engine = InProcess(Engine(model_path, config=config))
    except Exception as err:
        for conn in conns:
            conn.send_bytes(pickle.dumps(("failed", _error_of(err))))
        return
    info = {
        "model_path": engine.model_path,
        "config": config,
        "pid": os.getpid(),
        "max_model_len": engine.max_model_len,
        "family": engine.family,
        "limits": engine.engine.prompt_limits,
        "status": engine.status(),
    }
    workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="leagues-engine-call")
    child = _Child(engine, workers)
    links = [_Link(child, conn) for conn in conns]
    for link in links:
        link.conn.send_bytes(pickle.dumps(("ready", info)))
        link.outbox.thread.start()
    for link in links[1:]:
        threading.Thread(target=link.serve, name="leagues-engine-pipe", daemon=True).start()
    try:
        links[0].serve()
    finally:
        workers.shutdown(wait=False, cancel_futures=True)
        engine.close()
        for link in links:
            link.outbox.close()
        # now, not once every worker returns: one may wait minutes in a weight-group broadcast whose sender is
        # gone, and this process holds the GPU memory a restarted server needs
        os._exit(0)


@dataclass(slots=True)
class _Child:
    """What the engine process's links share: the engine, the call workers, and the weight-group join's lock."""

    engine: InProcess
    workers: ThreadPoolExecutor
    joining: threading.Lock = field(default_factory=threading.Lock)
    """Held while a weight-group join waits for its group: one at a time, whichever front asked."""


class _Link:
    """The engine's end of one link: the requests that came over it (`owned`), and its outbox."""

    def __init__(self, child: _Child, conn) -> None:
        self.child, self.conn = child, conn
        self.outbox = _Outbox(conn, child.engine.status)
        self.owned: set[str] = set()

    def serve(self) -> None:
        """Take the link's messages until it closes; then abort what it asked for and nobody will read."""
        engine = self.child.engine
        with contextlib.suppress(EOFError, OSError):
            while True:
                message = pickle.loads(self.conn.recv_bytes())
                kind = message[0]
                if kind == "add":
                    _, rid, ids, params = message
                    self._add(rid, ids, params)
                elif kind == "abort":
                    engine.abort(message[1])
                elif kind == "call":
                    _, call_id, name, args = message
                    self.child.workers.submit(self._answer, call_id, name, args)
                elif kind == "close":
                    break
        for rid in list(self.owned):
            engine.abort(rid)

    def _add(self, rid: str, ids: list[int], params: SamplingParams) -> None:
        outbox = self.outbox

        def on_token(index: int, token_id: int, logprob: float) -> None:  # on the engine's thread
            outbox.put(("token", rid, index, token_id, logprob))

        def finished(future: Future) -> None:
            self.owned.discard(rid)
            error = future.exception()
            outbox.put(("done", rid, future.result()) if error is None else ("failed", rid, _error_of(error)))

        self.owned.add(rid)  # before the engine has it: it may finish at once
        try:
            future = self.child.engine.submit(ids, params, rid, on_token)
        except Exception as err:  # the front checked the prompt; anything left fails this request only
            self.owned.discard(rid)
            outbox.put(("failed", rid, _error_of(err)))
            return
        future.add_done_callback(finished)

    def _answer(self, call_id: int, name: str, args: tuple) -> None:
        try:
            if name not in _CALLS:
                raise ValueError(f"unknown engine call {name!r}")
            if name == "weight_group" and args[0] == "init_weights_update_group":
                if not self.child.joining.acquire(blocking=False):
                    raise ValueError("a weight-group join is already under way")
                try:
                    value = self.child.engine.weight_group(*args)
                finally:
                    self.child.joining.release()
            else:
                value = getattr(self.child.engine, name)(*args)
            self.outbox.put(("answer", call_id, True, value))
        except Exception as err:
            self.outbox.put(("answer", call_id, False, _error_of(err)))
