"""Metrics sinks: where the RL loop's per-step metrics go (JSONL file, TensorBoard, Prometheus, console).

Where it sits: every step the loop gathers one flat `dict[str, float]` (`rollout/reward_mean`,
`train/loss`, `time/step`, ...) and calls `sink.log(step, metrics)` on the sink `build_sinks` made from
`ObsConfig`; at the end (or in a `finally`) it calls `sink.close()`. `leagues report` reads the JSONL
file back (`report.py`).

Decisions:
- A sink is anything with `log(step, metrics)` and `close()` (a `Protocol`); `MultiSink` fans out, so the
  loop holds one sink whatever is enabled.
- Only rank 0 logs: every other rank gets a `NullSink`, so the loop calls the same code on every rank.
  The loop reduces metrics across ranks before logging; sinks never communicate.
- Keys may differ from step to step (eval is periodic): every sink writes what it is given and nothing
  else; no sink invents a value for a missing key.
- JSONL is the source of truth: one object per step, flushed every line, so a crash loses at most the
  line being written. Non-finite floats become `null` (JSON has no NaN/Infinity). On resume from step k
  the file is first rewritten without the rows after k (temp file + `os.replace`, atomic), so a resumed
  run continues the file without duplicated or orphaned steps; a torn last line (crash mid-write) is
  dropped there too.
- TensorBoard resumes with `purge_step=k+1`, which tells TensorBoard to hide the events after k.
  The writer is flushed every step: RL steps take seconds, and the default 2-minute flush loses minutes.
- Prometheus uses its own `CollectorRegistry` (never the process-global one, so two sinks or tests in
  one process stay apart), one gauge per key named `leagues_<key with non-[a-zA-Z0-9_] as _>`, created
  on first sight. Two keys that sanitize to the same name would fight over one gauge: the later one is
  skipped with a warning.
- Heavy imports (torch's SummaryWriter, prometheus_client) happen when a sink is built, so importing
  `leagues.obs` stays cheap.
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from leagues.config import write_text_atomic
from leagues.obs.console import DEFAULT_CONSOLE_KEYS, ConsoleSink

Metrics = Mapping[str, float]
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class Sink(Protocol):
    """Receives one flat metrics dict per step."""

    def log(self, step: int, metrics: Metrics) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """Drops everything: what non-zero ranks (and disabled observability) get."""

    def log(self, step: int, metrics: Metrics) -> None:
        pass

    def close(self) -> None:
        pass


class MultiSink:
    """Fans every call out to several sinks, in order."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)

    def log(self, step: int, metrics: Metrics) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        """Closes every sink even if one fails (the first error is re-raised), so files are still flushed."""
        first_error = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # re-raised below, once the other sinks are closed
                first_error = first_error or e
        if first_error is not None:
            raise first_error


# ---------------------------------------------------------------------------------------------------
# JSONL


def json_value(value: Any) -> int | float | None:
    """A metric as JSON can hold it: ints (and bools) stay ints, non-finite floats become None."""
    if isinstance(value, bool | int):
        return int(value)
    value = float(value)  # also accepts 0-dim tensors and numpy scalars
    return value if math.isfinite(value) else None


def parse_row(line: str, where: str) -> dict[str, Any]:
    """One JSONL line as a metrics row; ValueError naming `where` (file:line) if it is not one."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}): {line.strip()[:80]!r}") from None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise ValueError(f"{where}: expected a JSON object with an integer 'step', got {line.strip()[:80]!r}")
    return row


class JSONLSink:
    """Appends `{"step": n, "time": unix seconds, **metrics}` to `run_dir/metrics.jsonl`, one line per step."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            truncate_after(self.path, resume_step)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: Metrics) -> None:
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update((k, json_value(v)) for k, v in metrics.items() if k not in row)
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_after(path: Path, step: int) -> int:
    """Rewrites `path` keeping the rows with step <= `step`, atomically; returns how many rows were kept.

    A last line that does not parse is a write torn by a crash and is dropped; a bad line before it is
    real damage and raises ValueError naming file:line rather than being silently thrown away.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = parse_row(line, f"{path}:{i + 1}")
        except ValueError:
            if i == len(lines) - 1:
                break
            raise
        if row["step"] <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))
    return len(kept)


# ---------------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardSink:
    """One scalar per key per step, in `run_dir/tensorboard`."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        purge_step = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log(self, step: int, metrics: Metrics) -> None:
        for key, value in metrics.items():
            if key != "step":
                self.writer.add_scalar(key, float(value), global_step=int(step))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# ---------------------------------------------------------------------------------------------------
# Prometheus


def prometheus_name(key: str, prefix: str = "leagues") -> str:
    """`train/kl/mean` -> `leagues_train_kl_mean`: Prometheus names allow only [a-zA-Z0-9_:]."""
    name = re.sub(r"[^a-zA-Z0-9_]+", "_", key).strip("_")
    return f"{prefix}_{name}"


class PrometheusSink:
    """Gauges `leagues_<key>` set every step, and `leagues_step`; optionally served over HTTP on `port`."""

    def __init__(self, port: int = 0, *, registry: Any = None, addr: str = "0.0.0.0") -> None:
        """`port=0` serves nothing (read `registry` yourself); `registry=None` makes a fresh one."""
        from prometheus_client import CollectorRegistry, Gauge

        self._gauge_cls = Gauge
        self.registry = registry if registry is not None else CollectorRegistry()
        self._gauges: dict[str, Any] = {}
        self._key_of_name: dict[str, str] = {}
        self.step_gauge = Gauge("leagues_step", "Last logged RL step", registry=self.registry)
        self._server = self._thread = None
        self.port = port
        if port:
            from prometheus_client import start_http_server

            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
            self.port = self._server.server_port

    def log(self, step: int, metrics: Metrics) -> None:
        self.step_gauge.set(int(step))
        for key, value in metrics.items():
            gauge = self._gauge(key) if key != "step" else None
            if gauge is not None:
                gauge.set(float(value))

    def _gauge(self, key: str) -> Any:
        """The key's gauge, made on first sight; None for a key whose name another key already took."""
        if key in self._gauges:
            return self._gauges[key]
        name = prometheus_name(key)
        if name in self._key_of_name or name == "leagues_step":
            warnings.warn(f"metric {key!r} maps to Prometheus name {name} already used; not exported", stacklevel=3)
            self._gauges[key] = None
            return None
        self._key_of_name[name] = key
        self._gauges[key] = self._gauge_cls(name, key, registry=self.registry)
        return self._gauges[key]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None


# ---------------------------------------------------------------------------------------------------
# config


@dataclass(kw_only=True, slots=True)
class ObsConfig:
    """Which sinks a run writes its per-step metrics to."""

    jsonl: bool = True
    """Append one JSON object per step to `<run_dir>/metrics.jsonl` (what `leagues report` reads)."""
    tensorboard: bool = True
    """Write TensorBoard scalars under `<run_dir>/tensorboard`."""
    prometheus_port: int = 0
    """Serve the latest metrics as Prometheus gauges (`leagues_<key>`) on this port; 0 serves nothing."""
    prometheus_addr: str = "0.0.0.0"
    """Address the Prometheus exporter binds to (`127.0.0.1` keeps it local to the machine)."""
    console: bool = True
    """Show a progress bar and a line of key metrics per step (plain lines when stdout is not a terminal)."""
    console_keys: list[str] = field(default_factory=lambda: list(DEFAULT_CONSOLE_KEYS))
    """Metrics shown on the console line, in order; keys missing from a step are left out of its line."""
    console_every: int = 1
    """Print the console line every this many steps (the progress bar updates every step)."""

    def __post_init__(self) -> None:
        if not 0 <= self.prometheus_port <= 65535:
            raise ValueError(f"prometheus_port: expected 0..65535, got {self.prometheus_port}")
        if self.console_every < 1:
            raise ValueError(f"console_every: expected >= 1, got {self.console_every}")


def build_sinks(
    cfg: ObsConfig, run_dir: str | Path, total_steps: int, resume_step: int | None = None, rank: int = 0
) -> Sink:
    """The run's sink: a `MultiSink` of the enabled sinks on rank 0, a `NullSink` on every other rank."""
    if rank != 0:
        return NullSink()
    sinks: list[Sink] = []
    if cfg.jsonl:
        sinks.append(JSONLSink(run_dir, resume_step=resume_step))
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir, resume_step=resume_step))
    if cfg.prometheus_port:
        sinks.append(PrometheusSink(cfg.prometheus_port, addr=cfg.prometheus_addr))
    if cfg.console:
        sinks.append(
            ConsoleSink(total_steps, keys=cfg.console_keys, start_step=resume_step or 0, every=cfg.console_every)
        )
    return MultiSink(sinks)
