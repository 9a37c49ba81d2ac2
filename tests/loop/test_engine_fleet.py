"""Chaos on real processes: `leagues train --engine_urls` over two `leagues serve` engines behind an API key
(the run sends it: `--fleet.api_key`), one killed with SIGKILL while it holds requests of a rollout, then
started again; with either weight transport to external engines (disk, and the distributed weight-update group
over gloo).

The run must finish every step with a full batch (no sample lost: the dead engine's requests are retried on the
other one and counted in `rollout/retried`), skip the dead engine's weight updates (`fleet/updated`), and take
the restarted engine back only once it has the current weights: it serves the last steps, at the run's final
weight version. The run is held (a reward that waits for a file) in step 4 until the restarted engine is up,
so a slow start cannot outlast the run.
"""

import os
import subprocess
import sys
import time

import httpx
import pytest

from leagues.model import resolve_model_path
from tests.loop.test_loop import REWARDS, ROOT, rl_rows
from tests.serve.engines import API_KEY, AUTH, EngineServer, free_port

STEPS, BATCH, N = 6, 8, 4
# few sequences at a time: an engine holds queued requests through most of a rollout, so the kill finds some
ENGINE_ARGS = ["--engine.num_blocks", "256", "--engine.max_model_len", "96", "--engine.max_num_seqs", "4"]


def train_args(run_dir, urls: list[str], transport: str) -> list[str]:
    return [
        "--task", "arithmetic", "--task_params", "{max_digits: 1}", "--reward.name", f"{REWARDS}:gated",
        "--reward.timeout_s", "120", "--steps", str(STEPS), "--rollout.batch_size", str(BATCH),
        "--rollout.n_samples_per_prompt", str(N), "--rollout.max_response_len", "8",
        "--engine_urls", f"[{','.join(urls)}]", "--fleet.health_interval", "0.2", "--fleet.api_key", API_KEY,
        "--weight_sync.transport", transport, "--weight_sync.port", str(free_port()),
        "--checkpoint.enabled", "false", "--report", "false", "--obs.tensorboard", "false",
        "--obs.console", "false", "--run_dir", str(run_dir),
    ]  # fmt: skip


def in_flight(url: str) -> int:
    try:
        return httpx.get(url + "/get_server_info", headers=AUTH, timeout=2).json()["num_in_flight_requests"]
    except httpx.HTTPError:
        return 0


def wait_for(condition, run: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert run.poll() is None, f"the run ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def finished_requests(url: str) -> float:
    lines = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("leagues_request_finished_total"))


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["disk", "distributed"])
def test_a_killed_engine_costs_no_sample_and_rejoins_at_the_current_weights(tmp_path, transport):
    tiny, run_dir, gate = resolve_model_path("tiny-moe"), tmp_path / "run", tmp_path / "gate"
    engines = [EngineServer(tiny, free_port(), tmp_path, args=ENGINE_ARGS) for _ in range(2)]
    victim = engines[0]
    env = os.environ | {"LEAGUES_TEST_GATE_AT": str(3 * BATCH * N + 1), "LEAGUES_TEST_GATE": str(gate),
                        "LEAGUES_TEST_COUNTER": str(tmp_path / "calls")}  # fmt: skip
    cmd = [sys.executable, "-m", "leagues.cli", "train", *train_args(run_dir, [e.url for e in engines], transport)]
    run = None
    try:
        for engine in engines:
            engine.start()
        for engine in engines:
            engine.wait_ready()
        run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # mid-run: after step 1, while the victim holds requests of a rollout (step 2's, or step 3's)
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and rl_rows(run_dir), run, "step 1")
        wait_for(lambda: in_flight(victim.url) >= 2, run, "requests on the victim")
        victim.kill()
        victim.start()  # the same port, the base weights (version 0): it must not serve until updated
        victim.wait_ready()
        gate.touch()
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, out[-5000:]
        served_after_restart = finished_requests(victim.url)
        version = httpx.get(victim.url + "/get_server_info", headers=AUTH, timeout=10).json()["weight_version"]
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        for engine in engines:
            engine.stop()
    rows = rl_rows(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    for row in rows:  # every step trains a full batch: no sample lost to the kill
        assert row["rollout/num_samples"] == BATCH * N and row["rollout/failed"] == 0, row
    assert sum(row["rollout/retried"] for row in rows) > 0  # the victim's requests, sent again to the other
    assert min(row["fleet/updated"] for row in rows) == 1  # the dead engine's weight update was skipped
    assert rows[-1]["fleet/updated"] == rows[-1]["fleet/healthy"] == 2  # it rejoined...
    assert version == STEPS and served_after_restart > 0  # ...with the current weights, and served
