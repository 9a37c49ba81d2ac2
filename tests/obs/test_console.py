"""`ConsoleSink`: plain, readable lines when the console is not a terminal; a live bar when it is."""

from io import StringIO

from rich.console import Console

from leagues.obs import ConsoleSink
from leagues.obs.console import format_duration, format_value, short_labels


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_without_a_terminal():
    out, clock = StringIO(), FakeClock()
    keys = ["rollout/reward_mean", "rollout/tokens_per_s", "train/tokens_per_s", "eval/accuracy"]
    sink = ConsoleSink(10, keys=keys, console=Console(file=out), clock=clock)
    assert not sink.console.is_terminal
    metrics = {"rollout/reward_mean": 0.51234, "rollout/tokens_per_s": 123456.7, "train/tokens_per_s": 98.0}
    for step in (1, 2):
        clock.now += 30.0
        sink.log(step, {**metrics, "time/step": 30.0})
    sink.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "step 1/10 (10%) | elapsed 0:00:30 | eta 0:04:30 | reward_mean 0.5123 rollout/tokens_per_s 123457 "
        "train/tokens_per_s 98",
        "step 2/10 (20%) | elapsed 0:01:00 | eta 0:04:00 | reward_mean 0.5123 rollout/tokens_per_s 123457 "
        "train/tokens_per_s 98",
    ]
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()


def test_resume_every_and_quiet():
    out, clock = StringIO(), FakeClock()
    sink = ConsoleSink(100, keys=["train/loss"], console=Console(file=out), start_step=50, every=2, clock=clock)
    for step in (51, 52, 53, 54):
        clock.now += 10.0
        sink.log(step, {"train/loss": 1.0})
    assert [line.split(" | ")[0] for line in out.getvalue().splitlines()] == ["step 52/100 (52%)", "step 54/100 (54%)"]
    assert "eta 0:07:40" in out.getvalue()  # 4 steps in 40 s since the resume, 46 to go
    out = StringIO()
    quiet = ConsoleSink(10, console=Console(file=out), quiet=True)
    quiet.log(1, {"train/loss": 1.0})
    quiet.close()
    assert out.getvalue() == ""


def test_terminal_mode_draws_a_bar_and_prints_the_line():
    out = StringIO()
    sink = ConsoleSink(4, keys=["train/loss"], console=Console(file=out, force_terminal=True, width=100))
    for step in range(1, 5):
        sink.log(step, {"train/loss": 0.25})
    sink.close()
    text = out.getvalue()
    assert "step 4 | loss 0.25" in text and "4/4" in text


def test_labels_and_formatting():
    assert short_labels(["rollout/reward_mean", "train/entropy/mean", "train/kl/mean", "time/step"]) == {
        "rollout/reward_mean": "reward_mean",
        "train/entropy/mean": "entropy/mean",
        "train/kl/mean": "kl/mean",
        "time/step": "time/step",
    }
    assert [format_value(v) for v in (0.000123456, 3.0, 2048.0, 12345.6, float("nan"))] == [
        "0.0001235",
        "3",
        "2048",
        "12346",
        "nan",
    ]
    assert format_duration(3725.9) == "1:02:05"
