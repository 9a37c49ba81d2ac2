"""Step timing: named sections of wall time per RL step, and the idle time between them.

Where it sits: the loop wraps each phase of a step (`with timer.section("rollout"): ...`, `"reward"`,
`"logprob"`, `"train"`, `"sync"`) and, once per step, merges `timer.pop()` into the metrics it logs:
`time/<name>` for each section, `time/step` (wall time since the previous pop) and `time/idle`.

Decisions:
- A section entered several times in one step adds up. Sections may nest (`reward` inside `rollout`):
  each reports its own time, and only top-level sections count against the step when computing
  `time/idle` = `time/step` - sum of top-level sections, clipped at 0 (clocks and syncs jitter).
  A section re-entered inside itself counts once, by its outermost entry, so recursion is not double-counted.
- `sync` (e.g. `torch.cuda.synchronize`) is called at every section boundary and at `pop()`: CUDA work
  is asynchronous, and without it a section would measure the launch of its kernels, not their run.
  It costs a host-device sync per boundary, a handful per step.
- `clock` is injectable (default `time.perf_counter`), so the arithmetic is tested without sleeping.
- Not thread-safe: one timer per thread (an async pipeline keeps one per worker).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

RESERVED = frozenset({"step", "idle"})


class StepTimer:
    """Accumulates seconds per section name until `pop()` returns them as `time/*` metrics and resets."""

    def __init__(self, sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.sync = sync
        self.clock = clock
        self.totals: dict[str, float] = {}
        self.top_level_seconds = 0.0
        self.open_sections: list[str] = []
        self.step_start = clock()

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return self.clock()

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time the body as section `name` (reported as `time/<name>`)."""
        if name in RESERVED:
            raise ValueError(f"section name {name!r} is reserved (time/{name} is computed by pop())")
        counted = name not in self.open_sections
        self.open_sections.append(name)
        start = self._now()
        try:
            yield
        finally:
            seconds = self._now() - start
            self.open_sections.pop()
            if counted:
                self.totals[name] = self.totals.get(name, 0.0) + seconds
                if not self.open_sections:
                    self.top_level_seconds += seconds

    def pop(self) -> dict[str, float]:
        """`{"time/<name>": s, ..., "time/step": s, "time/idle": s}` for the step just ended; starts the next."""
        if self.open_sections:
            raise RuntimeError(f"pop() inside open section(s) {self.open_sections}: their time would be lost")
        now = self._now()
        step_seconds = now - self.step_start
        metrics = {f"time/{name}": seconds for name, seconds in self.totals.items()}
        metrics["time/step"] = step_seconds
        metrics["time/idle"] = max(step_seconds - self.top_level_seconds, 0.0)
        self.totals, self.top_level_seconds, self.step_start = {}, 0.0, now
        return metrics
