"""Console progress: a progress bar over the run's steps and one compact line of key metrics per step.

Where it sits: one of the sinks `build_sinks` makes (rank 0 only); the loop calls `log(step, metrics)`
after every step, like any other sink.

Decisions:
- Two modes, picked by `Console.is_terminal`: on a terminal, a live `rich` progress bar (step/total,
  elapsed, ETA) with the metric lines printed above it; otherwise (a log file, `nohup`, a CI job) plain
  lines only, each carrying step/total, elapsed and ETA, with no control characters and no wrapping.
- The ETA is computed here from the steps done since the sink was built (a resumed run counts from its
  resume step), not by rich: rich's speed estimate forgets samples older than 30 s, and RL steps are
  often longer than that.
- Labels are the shortest unique tail of each key (`rollout/reward_mean` -> `reward_mean`,
  `train/entropy/mean` -> `entropy/mean`), so the line stays short without two keys sharing a label.
- `quiet=True` prints nothing at all, for scripts and tests that build the full sink set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

DEFAULT_CONSOLE_KEYS = (
    "rollout/reward_mean",
    "rollout/pass_rate",
    "eval/accuracy",
    "rollout/response_len_mean",
    "train/loss",
    "train/grad_norm",
    "train/entropy/mean",
    "train/mismatch/kl",
    "time/step",
)


def short_labels(keys: Sequence[str]) -> dict[str, str]:
    """Each key's shortest tail of `/`-separated parts that no other key in `keys` ends with (never bare `step`)."""
    labels = {}
    for key in keys:
        parts = key.split("/")
        for n in range(1, len(parts) + 1):
            tail = "/".join(parts[-n:])
            # a bare `step` label would read as the step number at the head of the line
            if tail != "step" and not any(
                other != key and (other == tail or other.endswith("/" + tail)) for other in keys
            ):
                break
        labels[key] = tail
    return labels


def format_value(value: float) -> str:
    """Four significant digits, but large values (tokens/s, lengths) in full rather than in e-notation."""
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1e4:
        return f"{value:.0f}"
    return f"{value:.4g}"


def format_duration(seconds: float) -> str:
    """`3725.2` -> `1:02:05`."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ConsoleSink:
    """Progress bar plus a metrics line per step (every `every` steps), on a `rich` Console (stdout by default)."""

    def __init__(
        self,
        total_steps: int,
        keys: Sequence[str] = DEFAULT_CONSOLE_KEYS,
        *,
        console: Any = None,
        start_step: int = 0,
        every: int = 1,
        quiet: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from rich.console import Console

        self.total_steps, self.start_step, self.every, self.quiet = total_steps, start_step, every, quiet
        self.labels = short_labels(list(keys))
        self.console = console if console is not None else Console()
        self.clock = clock
        self.start_time = clock()
        self._progress = self._task = None
        if not quiet and self.console.is_terminal:
            self._start_bar()

    def _start_bar(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]step"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}"),
            console=self.console,
        )
        total = self.total_steps if self.total_steps > 0 else None
        self._task = self._progress.add_task("steps", total=total, completed=self.start_step, eta="?")
        self._progress.start()

    def eta(self, step: int) -> float | None:
        """Seconds left at the average pace since the sink was built; None before the first step or without a total."""
        done = step - self.start_step
        if done <= 0 or self.total_steps <= 0:
            return None
        return (self.clock() - self.start_time) / done * max(self.total_steps - step, 0)

    def line(self, step: int, metrics: Mapping[str, float]) -> str:
        """The metrics line of one step; in plain mode it also carries step/total, elapsed and ETA."""
        if self._progress is not None:
            head = f"step {step}"
        else:
            eta = self.eta(step)
            total = f"/{self.total_steps} ({100 * step / self.total_steps:.0f}%)" if self.total_steps > 0 else ""
            elapsed = format_duration(self.clock() - self.start_time)
            head = f"step {step}{total} | elapsed {elapsed} | eta {'?' if eta is None else format_duration(eta)}"
        values = [f"{label} {format_value(metrics[key])}" for key, label in self.labels.items() if key in metrics]
        return " | ".join([head, " ".join(values)]) if values else head

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            eta = self.eta(step)
            self._progress.update(self._task, completed=step, eta="?" if eta is None else format_duration(eta))
        if (step - self.start_step) % self.every == 0 or step == self.total_steps:
            # soft_wrap: a long line stays one line in a log file instead of being cut at 80 columns.
            self.console.print(self.line(step, metrics), soft_wrap=True, markup=False, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
