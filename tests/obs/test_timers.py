"""`StepTimer` arithmetic with an injected clock: sections add up, nesting, idle time, sync calls."""

import time

import pytest

from leagues.obs import StepTimer


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def test_sections_add_up_and_idle_is_the_rest():
    clock = FakeClock()
    timer = StepTimer(clock=clock)
    with timer.section("rollout"):
        clock.advance(3.0)
        with timer.section("reward"):  # nested: reported, not counted twice against the step
            clock.advance(1.0)
    clock.advance(0.5)  # idle
    with timer.section("train"):
        clock.advance(2.0)
    with timer.section("train"):  # re-entered: adds up
        clock.advance(1.0)
    clock.advance(0.25)
    metrics = timer.pop()
    assert metrics == pytest.approx(
        {"time/rollout": 4.0, "time/reward": 1.0, "time/train": 3.0, "time/step": 7.75, "time/idle": 0.75}
    )
    clock.advance(2.0)
    assert timer.pop() == pytest.approx({"time/step": 2.0, "time/idle": 2.0})  # reset: next step starts at pop


def test_section_reentered_inside_itself_counts_once():
    clock = FakeClock()
    timer = StepTimer(clock=clock)
    with timer.section("rollout"):
        clock.advance(1.0)
        with timer.section("rollout"):
            clock.advance(2.0)
    assert timer.pop() == pytest.approx({"time/rollout": 3.0, "time/step": 3.0, "time/idle": 0.0})


def test_idle_is_never_negative():
    times = iter([0.0, 0.0, 5.0, 4.0])  # a clock that steps back (it happens across sync jitter)
    timer = StepTimer(clock=lambda: next(times))
    with timer.section("train"):
        pass
    assert timer.pop()["time/idle"] == 0.0


def test_sync_is_called_at_every_boundary_and_at_pop():
    calls = []
    timer = StepTimer(sync=lambda: calls.append(1), clock=FakeClock())
    with timer.section("a"), timer.section("b"):
        pass
    timer.pop()
    assert len(calls) == 5


def test_misuse_raises():
    timer = StepTimer()
    with pytest.raises(ValueError, match="reserved"), timer.section("idle"):
        pass
    with timer.section("train"), pytest.raises(RuntimeError, match="train"):
        timer.pop()


def test_real_clock_measures_sleeps():
    timer = StepTimer()
    with timer.section("rollout"):
        time.sleep(0.02)
    time.sleep(0.01)
    metrics = timer.pop()
    assert 0.015 < metrics["time/rollout"] < 0.5
    assert metrics["time/step"] >= metrics["time/rollout"] and 0.005 < metrics["time/idle"] < 0.5
