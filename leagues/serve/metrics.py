"""Prometheus metrics of the HTTP server: one `ServerMetrics` (with its own registry) per app.

Where it sits: `server.py` counts every HTTP request here, the generation routes report tokens and
latencies, and `GET /metrics` refreshes the engine gauges and renders the registry.

Decisions:
- A registry per app, never prometheus-client's global one: two servers (or tests) in one process stay
  apart, and there is no module-level mutable state.
- Several front processes (`leagues serve --fronts N`) count into one set of files: `leagues serve` sets
  `PROMETHEUS_MULTIPROC_DIR` before it starts them (prometheus-client reads it at import), and `render` then sums
  every front's counters and histograms, whichever front a scrape reaches; an engine gauge is the value a front
  set last (they all read the same engine).
- Engine gauges (queue, running, KV blocks, prefix hits) are read at scrape time, not pushed from the
  engine thread: scrapes are rare, steps are not. Reading lengths of the engine's containers from another
  thread is a benign race (a value one step old).
- Latencies are measured in the server from the engine's per-token callback: time to first token from
  arrival, inter-token gaps, end to end. The engine's own share of time to first token (from its loop taking
  the request, as the outputs carry it) is a histogram of its own, and so are the two hops between the front
  and the engine's loop (in, and back with the first token): the front's share is their sum. Names follow
  vLLM/SGLang conventions with a `leagues_` prefix.
"""

import os
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import Gauge as _Gauge
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
Gauge = partial(_Gauge, multiprocess_mode="mostrecent")  # the mode matters only when several fronts count

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("leagues_http_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("leagues_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("leagues_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter("leagues_request_finished", "Finished samples", ["finish_reason"], registry=r)
        self.waiting = Gauge("leagues_num_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        self.running = Gauge("leagues_num_requests_running", "Sequences running", registry=r)
        self.kv_used = Gauge("leagues_kv_cache_blocks_used", "KV-cache blocks in use", registry=r)
        self.kv_total = Gauge("leagues_kv_cache_blocks_total", "KV-cache blocks", registry=r)
        self.prefix_hit_rate = Gauge(
            "leagues_prefix_cache_hit_rate", "Prefix-cache hits over lookups (blocks), since start", registry=r
        )
        self.weight_version = Gauge("leagues_weight_version", "Version of the served weights", registry=r)
        self.ttft = Histogram(
            "leagues_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.engine_ttft = Histogram(
            "leagues_engine_time_to_first_token_seconds",
            "The engine's share of time to first token: its loop taking the request to the first token on the host",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.to_engine = Histogram(
            "leagues_front_to_engine_seconds",
            "The front admitting a request to the engine's loop taking it (the hop to the engine and its inbox)",
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.from_engine = Histogram(
            "leagues_engine_to_front_seconds",
            "A request's first token on the engine's host to the front holding it (the hop back)",
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "leagues_inter_token_latency_seconds", "Gap between tokens", buckets=TOKEN_GAP_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "leagues_e2e_request_latency_seconds", "Arrival to completion", buckets=LATENCY_BUCKETS, registry=r
        )

    def observe_http(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_sample(self, start: float, token_times: list[float], end: float) -> None:
        """Latencies of one sample: `token_times` are the monotonic times its tokens were sampled."""
        if token_times:
            self.ttft.observe(token_times[0] - start)
        for before, after in zip(token_times, token_times[1:], strict=False):
            self.itl.observe(after - before)
        self.e2e.observe(end - start)

    def refresh(self, status) -> None:
        """Engine gauges from its `EngineStatus`, read at scrape time."""
        self.waiting.set(status.num_waiting)
        self.running.set(status.num_running)
        self.kv_total.set(status.num_blocks)
        self.kv_used.set(status.num_blocks - status.num_free_blocks)
        queries = status.prefix_queries
        self.prefix_hit_rate.set(status.prefix_hits / queries if queries else 0.0)
        self.weight_version.set(status.weight_version)

    def render(self) -> bytes:
        if os.environ.get(MULTIPROC_DIR):  # several fronts: every front's files, this one's included
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
