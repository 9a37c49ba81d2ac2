"""The HTTP front alone: `leagues serve`'s app and server in front of a stand-in engine that costs nothing.

The stand-in has the front's engine surface (`submit` with `on_token`, `abort`, `status`, the tokenizer) and a loop
thread that, every `--step-ms`, gives each running request its next token, as a GPU engine at that step time
would, while doing almost no host work itself. So what the clients receive is what the front can deliver, and
the loop thread's achieved step time shows how long it waited for the interpreter lock behind the event loop
(it needs the lock only for a few microseconds a step). The app, its middleware, uvicorn and the streaming code
are the real ones, in one process as `leagues serve` runs them; the clients are `benchmarks/server.py`'s.

One row per run to $OUT/server_front.jsonl: `clients`, `stream`, `step_ms` (asked), `engine_step_ms` (achieved,
mean over busy steps), `engine_busy_ms_per_step` (the stand-in's own work), `target_tokens_per_s` (clients /
step), `server_tokens_per_s` (what the clients got), `ttft_ms_p50`, `itl_ms_p50`, `front_cpu_share` (this
process's CPU seconds a second: the front and the stand-in).

    PYTHONPATH=. python benchmarks/server_front.py [--clients 8,64] [--stream both] [--step-ms 1.6] [--host-ms 0.8]
        [--stream-interval 1]
        [--switch-interval-ms 0.5]

`--host-ms` makes the stand-in hold the GIL that long a step (a real engine's Python work between launches), so
the achieved step shows what waiting for the lock behind the event loop costs at a given switch interval.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import Future

import uvicorn

from benchmarks.server import run_server
from leagues.cli.serve import event_loop_factory
from leagues.engine.config import EngineConfig
from leagues.engine.output import Output
from leagues.model import load_tokenizer, resolve_model_path
from leagues.serve.engine_process import SWITCH_INTERVAL_S, EngineStatus
from leagues.serve.server import create_app
from leagues.types import FinishReason


class StandInEngine:
    """Tokens on a clock: every `step_s`, one token (id 5 + step % 50, logprob -1) for every running request."""

    def __init__(self, step_s: float, tokenizer, host_s: float = 0.0) -> None:
        self.step_s, self.tokenizer, self.host_s = step_s, tokenizer, host_s
        self.model_path, self.asleep, self.weight_version, self.max_model_len = None, False, 0, 1 << 20
        self.config, self.stats = EngineConfig(), {}
        self.running: dict[str, list] = {}
        self.lock = threading.Lock()
        self.steps, self.busy_s, self.tokens, self.closed = [], 0.0, 0, False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    @property
    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def status(self) -> EngineStatus:
        return EngineStatus(alive=self.is_alive, asleep=False, weight_version=0, num_running=len(self.running))

    fresh_status = status

    def flush_cache(self) -> None:
        pass

    def submit(self, prompt, params, request_id=None, on_token=None) -> Future:
        future: Future = Future()
        with self.lock:
            self.running[request_id] = [list(prompt), params, on_token, future, []]
        return future

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.running.pop(request_id, None)

    def _loop(self) -> None:
        next_step = time.perf_counter()
        while not self.closed:
            next_step += self.step_s
            delay = next_step - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            start = time.perf_counter()
            with self.lock:
                items = list(self.running.items())
            if not items:
                next_step = time.perf_counter()
                continue
            self.steps.append(start)
            _spin(self.host_s)  # the engine's own host work a step (Python: it holds the GIL)
            for rid, (prompt, params, on_token, future, tokens) in items:
                token = 5 + len(self.steps) % 50
                tokens.append(token)
                if on_token is not None:
                    on_token(0, token, -1.0)
                if len(tokens) >= params.max_new_tokens:
                    with self.lock:
                        self.running.pop(rid, None)
                    out = Output(request_id=rid, index=0, prompt_token_ids=prompt, token_ids=tokens,
                                 logprobs=[-1.0] * len(tokens), finish_reason=FinishReason.LENGTH)  # fmt: skip
                    future.set_result([out])
            self.tokens += len(items)
            self.busy_s += time.perf_counter() - start


def _spin(seconds: float) -> None:
    """`seconds` of this thread's CPU time (time spent waiting for the GIL does not count)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def serve(
    engine: StandInEngine, switch_interval: float, stream_interval: int = 1
) -> tuple[uvicorn.Server, str, threading.Thread]:
    """The app under uvicorn on a thread of this process (the event loop's thread, as `leagues serve` has one), with
    the event loop and the GIL switch interval `leagues serve` uses."""
    sys.setswitchinterval(switch_interval)
    app = create_app(engine, stream_interval=stream_interval)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))

    def run() -> None:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(server.serve(sockets=[sock]))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}", thread


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", default="8,64")
    parser.add_argument("--stream", default="both", choices=["true", "false", "both"])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--step-ms", type=float, default=1.6, help="the stand-in engine's decode step")
    parser.add_argument("--client-procs", type=int, default=1)
    parser.add_argument("--host-ms", type=float, default=0.0, help="Python work the stand-in does a step (GIL held)")
    parser.add_argument("--stream-interval", type=int, default=1, help="leagues serve's --stream_interval")
    parser.add_argument("--switch-interval-ms", type=float, default=SWITCH_INTERVAL_S * 1e3,
                        help="the GIL switch interval (leagues serve's by default)")  # fmt: skip
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_model_path("tiny-moe"))
    body = {"input_ids": list(range(5, 69)), "sampling_params": {"max_new_tokens": args.new_tokens}}
    for clients in [int(c) for c in args.clients.split(",")]:
        for stream in {"true": [True], "false": [False], "both": [True, False]}[args.stream]:
            engine = StandInEngine(args.step_ms / 1e3, tokenizer, args.host_ms / 1e3)
            server, url, thread = serve(engine, args.switch_interval_ms / 1e3, args.stream_interval)
            served = run_server(
                url, body, stream, clients, (1, args.requests), args.client_procs, None, {"front": os.getpid()}
            )
            engine.closed, server.should_exit = True, True
            thread.join(timeout=10)
            gaps = [b - a for a, b in zip(engine.steps, engine.steps[1:], strict=False) if b - a < 0.1]
            row = dict(
                clients=clients,
                stream=stream,
                step_ms=args.step_ms,
                host_ms=args.host_ms,
                switch_interval_ms=args.switch_interval_ms,
                stream_interval=args.stream_interval,
                engine_step_ms=round(statistics.fmean(gaps) * 1e3, 3) if gaps else None,
                engine_busy_ms_per_step=round(engine.busy_s / max(len(engine.steps), 1) * 1e3, 3),
                target_tokens_per_s=round(clients / (args.step_ms / 1e3), 1),
                server_tokens_per_s=served["tokens_per_s"],
                ttft_ms_p50=served["ttft_ms_p50"],
                itl_ms_p50=served["itl_ms_p50"],
                latency_ms_p50=served["latency_ms_p50"],
                front_cpu_share=served["front_cpu_share"],
                new_tokens=args.new_tokens,
                requests=clients * args.requests,
                date=time.strftime("%F"),
            )
            print(json.dumps(row), flush=True)
            with open(os.path.join(os.environ.get("OUT", "/tmp"), "server_front.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
