"""User rewards of the loop tests, loaded as `tests.loop.rewards_for_tests:NAME` (the repo root is on sys.path)."""

import os
import signal
import threading
import time
from pathlib import Path

_COUNTING = threading.Lock()


def starts_with_one(prompt: str, response: str, label, metadata: dict) -> float:
    """An easy reward for a tiny model to learn in a few steps: the answer starts with "1"."""
    return 1.0 if response.startswith("1") else 0.0


def flaky(prompt: str, response: str, label, metadata: dict) -> float:
    """Raises for every answer that starts with "1"; the run must survive it."""
    if response.startswith("1"):
        raise RuntimeError("this reward is broken for answers starting with 1")
    return 1.0 if response.strip() == str(label) else 0.0


def by_name(response, label) -> float:
    """Bound by parameter name (no prompt, no metadata)."""
    return 1.0 if response.strip() == str(label) else 0.0


def always_fails(response) -> float:
    raise RuntimeError(f"this reward cannot score {response!r}")


def scrape_exporter(response, label) -> float:
    """`by_name`, and on every call a scrape of the run's Prometheus exporter (LEAGUES_TEST_SCRAPE_URL) written to
    LEAGUES_TEST_SCRAPE_OUT: what a Prometheus server would see in the middle of the run."""
    import httpx

    url, out = os.environ.get("LEAGUES_TEST_SCRAPE_URL"), os.environ.get("LEAGUES_TEST_SCRAPE_OUT")
    if url and out:
        Path(out).write_text(httpx.get(url, timeout=5).text)
    return by_name(response, label)


def kill_once(response, label) -> float:
    """`by_name`, but SIGKILLs its own process on exactly the Nth call counted in LEAGUES_TEST_COUNTER (across
    restarts) when LEAGUES_TEST_KILL_AT=N: one crash at a known point of a run, and none after it resumes."""
    at, counter = os.environ.get("LEAGUES_TEST_KILL_AT"), os.environ.get("LEAGUES_TEST_COUNTER")
    if at and counter:
        with _COUNTING:  # concurrent calls (threads of one process) each get a number of their own
            path = Path(counter)
            with path.open("a") as f:
                f.write("x")
            number = path.stat().st_size
        if number == int(at):
            os.kill(os.getpid(), signal.SIGKILL)
    return by_name(response, label)


def gated(prompt: str, response: str, label, metadata: dict) -> float:
    """`starts_with_one`, but from the Nth call on (LEAGUES_TEST_GATE_AT=N, calls counted in LEAGUES_TEST_COUNTER)
    it waits until the file LEAGUES_TEST_GATE exists (90 s at most): a test holds a run at a known point."""
    at, counter, gate = (
        os.environ.get(k) for k in ("LEAGUES_TEST_GATE_AT", "LEAGUES_TEST_COUNTER", "LEAGUES_TEST_GATE")
    )
    if at and counter and gate:
        path = Path(counter)
        with path.open("a") as f:
            f.write("x")
        deadline = time.monotonic() + 90
        while path.stat().st_size >= int(at) and not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return starts_with_one(prompt, response, label, metadata)


def odd_first_char(response) -> float:
    """A signal for any policy, an untrained one too: about half of all answers start with a character of odd code."""
    return float(bool(response) and ord(response[0]) % 2 == 1)
