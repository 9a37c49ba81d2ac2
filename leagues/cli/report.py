"""`leagues report`: plots and a markdown summary of a run, from the `metrics.jsonl` its sinks wrote.

Where it sits: reads what `leagues.obs.sinks.JSONLSink` wrote during `leagues train` (it works on a run
still in progress: the file is flushed every step) and calls `leagues.obs.report.write_report`.

Decisions:
- A missing run directory, metrics file or a damaged line is bad user input: it becomes a `UsageError`
  (one `leagues: error: ...` line, exit 2) naming the file (and line).
- The summary path goes first on stdout, then every file written, one per line, so a script can take
  the first line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leagues.cli import UsageError


@dataclass(kw_only=True, slots=True)
class ReportConfig:
    """Which run to report on, and where to write the report."""

    run_dir: str = ""
    """Run directory holding `metrics.jsonl` (and `config.yaml`, linked from the summary when present)."""
    out: str | None = None
    """Directory for the PNGs and `summary.md`; default `<run_dir>/report`."""


def run_report(cfg: ReportConfig) -> int:
    """The `leagues report` verb."""
    from leagues.obs.report import write_report

    if not cfg.run_dir:
        raise UsageError("report needs --run_dir DIR (a run directory holding metrics.jsonl)")
    if not Path(cfg.run_dir).is_dir():
        raise UsageError(f"--run_dir {cfg.run_dir}: no such directory")
    try:
        files = write_report(cfg.run_dir, cfg.out)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    summary = files[-1]
    print(f"summary: {summary}")
    for path in files:
        print(f"  {path}")
    return 0
