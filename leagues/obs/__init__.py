"""Observability: where a run's per-step metrics go, how its steps are timed, and its report.

Where it sits: the RL loop builds one sink with `build_sinks(ObsConfig, run_dir, total_steps)`, times
each phase of a step with a `StepTimer`, and logs one flat `dict[str, float]` per step; `leagues report`
turns the `metrics.jsonl` it leaves into plots and a markdown summary.

    sinks.py     Sink protocol; JSONLSink, TensorBoardSink, PrometheusSink, MultiSink, NullSink;
                 ObsConfig and build_sinks (rank 0 logs, other ranks get a NullSink)
    console.py   ConsoleSink: progress bar and a line of key metrics (plain lines off a terminal)
    timers.py    StepTimer: `with timer.section("rollout")`, `pop()` -> time/<name>, time/step, time/idle
    plots.py     the report's figures (matplotlib, no pyplot)
    report.py    read_metrics, write_report (PNGs + summary.md)

Decisions: this package imports nothing from leagues but `config` (DESIGN.md: obs is a leaf), and its
heavy dependencies (torch's SummaryWriter, prometheus_client) load only when a sink is built;
`report` (numpy, matplotlib) is imported by whoever writes a report: `from leagues.obs.report import write_report`.
"""

from leagues.obs.console import ConsoleSink
from leagues.obs.sinks import (
    JSONLSink,
    MultiSink,
    NullSink,
    ObsConfig,
    PrometheusSink,
    Sink,
    TensorBoardSink,
    build_sinks,
)
from leagues.obs.timers import StepTimer

__all__ = [
    "ConsoleSink",
    "JSONLSink",
    "MultiSink",
    "NullSink",
    "ObsConfig",
    "PrometheusSink",
    "Sink",
    "StepTimer",
    "TensorBoardSink",
    "build_sinks",
]
