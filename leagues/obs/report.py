"""A run's report: PNG plots and a markdown summary, built from its `metrics.jsonl`.

Where it sits: after (or during) a run, `leagues report --run_dir DIR` calls `write_report(DIR)`, which
reads the rows `JSONLSink` wrote, saves each figure of `plots.PLOTS` and writes `summary.md` beside them
(in `DIR/report/` unless told otherwise).

Decisions:
- Reading is strict about damage and lenient about shape: a line that is not a JSON object with an
  integer `step` raises ValueError naming file:line; keys may come and go between rows. If a step appears
  twice (a resumed run whose file was not truncated), the later row wins.
- A plot whose keys the run never logged is skipped (and a stale file of that name from an earlier
  report removed), and the summary says so, rather than drawing empty axes.
- "Best" is the maximum: every summarised outcome (reward, pass rate, accuracy) is higher-is-better.
- The time breakdown shares are total section time over total step time. Sections the loop nests inside
  others overlap, so shares can sum past 100%; `idle` is what no top-level section covered.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leagues.obs.console import format_duration, format_value
from leagues.obs.plots import PLOTS, Row, column, time_keys
from leagues.obs.sinks import METRICS_FILE, parse_row

REPORT_DIR = "report"
SUMMARY_FILE = "summary.md"
CONFIG_FILE = "config.yaml"
OUTCOMES = (
    ("reward mean", "rollout/reward_mean"),
    ("pass rate", "rollout/pass_rate"),
    ("eval accuracy", "eval/accuracy"),
)
SKIP_REASONS = {
    "reward.png": "no reward, pass rate or eval accuracy logged",
    "lengths.png": "no response length or truncation metrics logged",
    "time.png": "no time/step or time sections logged",
    "mismatch.png": "no mismatch metrics logged",
    "expert_load.png": "no per-layer expert load logged (a dense model, or a run before load metrics existed)",
}


def read_metrics(path: str | Path) -> list[Row]:
    """The rows of a metrics JSONL file, sorted by step, one per step: rows of one step merge, the last written
    value of a key winning (a disaggregated run logs a step's held-out accuracy after the step's own row)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    by_step: dict[int, Row] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                row = parse_row(line, f"{path}:{lineno}")
                by_step[row["step"]] = by_step.get(row["step"], {}) | row
    if not by_step:
        raise ValueError(f"{path}: no metrics rows")
    return [by_step[s] for s in sorted(by_step)]


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Writes the plots and `summary.md` into `out_dir` (default `run_dir/report`); returns the files written."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / METRICS_FILE)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], {}
    for name, build in PLOTS.items():
        fig = build(rows)
        if fig is None:
            skipped[name] = SKIP_REASONS[name]
            (out_dir / name).unlink(missing_ok=True)  # a stale plot from an earlier report would mislead
            continue
        fig.savefig(out_dir / name)
        written.append(out_dir / name)
    summary = out_dir / SUMMARY_FILE
    summary.write_text(summary_markdown(rows, run_dir, out_dir, written, skipped), encoding="utf-8")
    return [*written, summary]


def summary_markdown(
    rows: Sequence[Row], run_dir: Path, out_dir: Path, plots: Sequence[Path], skipped: dict[str, str]
) -> str:
    """The whole `summary.md`: run facts, outcomes, time per step, plots."""
    sections = [
        ["# Run report", "", *_run_facts(rows, run_dir, out_dir)],
        ["## Outcomes", "", *_outcomes_table(rows)],
        ["## Time per step", "", *_time_section(rows)],
        ["## Plots", "", *_plot_links(plots, skipped)],
    ]
    return "\n\n".join("\n".join(lines).rstrip() for lines in sections) + "\n"


def _run_facts(rows: Sequence[Row], run_dir: Path, out_dir: Path) -> list[str]:
    first, last = rows[0], rows[-1]
    facts = [f"- Run directory: `{run_dir.resolve()}`"]
    config = run_dir / CONFIG_FILE
    if config.is_file():
        facts.append(f"- Config: [`{CONFIG_FILE}`]({os.path.relpath(config, out_dir)}) (the run's resolved config)")
    facts.append(f"- Steps: {len(rows)} logged, step {first['step']} to {last['step']}")
    if isinstance(first.get("time"), int | float) and isinstance(last.get("time"), int | float):
        facts.append(f"- Wall clock from first to last logged step: {format_duration(last['time'] - first['time'])}")
    return facts


def _outcomes_table(rows: Sequence[Row]) -> list[str]:
    lines = ["| metric | first | last | best | best at step |", "|---|---|---|---|---|"]
    for label, key in OUTCOMES:
        steps, values = column(rows, key)
        if not len(values):
            lines.append(f"| {label} (`{key}`) | not logged | | | |")
            continue
        best = int(np.argmax(values))
        first, last, top = (format_value(v) for v in (values[0], values[-1], values[best]))
        lines.append(f"| {label} (`{key}`) | {first} | {last} | {top} | {steps[best]} |")
    return lines


def _time_section(rows: Sequence[Row]) -> list[str]:
    timed = [r for r in rows if r.get("time/step") is not None]
    if not timed:
        lines = ["No `time/step` logged."]
    else:
        total = sum(r["time/step"] for r in timed)
        lines = [f"Mean step time: {format_value(total / len(timed))} s over {len(timed)} steps.", ""]
        lines += ["| section | mean (s) | share of step |", "|---|---|---|"]
        for key in time_keys(timed):
            seconds = sum(r.get(key) or 0.0 for r in timed)
            share = f"{100 * seconds / total:.1f}%" if total > 0 else "n/a"
            lines.append(f"| {key.removeprefix('time/')} | {format_value(seconds / len(timed))} | {share} |")
    throughput = []
    for label, key in (("rollout", "rollout/tokens_per_s"), ("train", "train/tokens_per_s")):
        values = column(rows, key)[1]
        if len(values):
            throughput.append(f"{label} {format_value(values.mean())} tokens/s")
    if throughput:
        lines += ["", f"Mean throughput: {', '.join(throughput)}."]
    return lines


def _plot_links(plots: Sequence[Path], skipped: dict[str, str]) -> list[str]:
    lines = []
    for path in plots:
        lines += [f"### {path.stem}", "", f"[{path.name}]({path.name})", "", f"![{path.stem}]({path.name})", ""]
    lines += [f"- `{name}` not written: {reason}." for name, reason in skipped.items()]
    return lines
