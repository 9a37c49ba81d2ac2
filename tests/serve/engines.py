"""Engine server processes for the fleet, router and loop tests: `leagues serve` on a fixed loopback port, so a
test can kill one (a real SIGKILL) and start it again where the fleet expects it.

These servers keep the engine on a thread of the server's process (`--engine_process false`): that is the
option's test through the CLI, and each start saves the engine process's own start (seconds on a 2-core
machine). The default, the engine in its own process, is what `test_server.py`, `test_server_robust.py`,
`test_engine_process.py` and the scripted servers run."""

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

API_KEY = "router-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Poll `url/health` until it answers 200; fail with the process's log if it exits or hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout} s:\n{log.read_text()}")


class EngineServer:
    """One engine server process on a fixed port; `kill` and `start` again keep the port. With `api_key` the
    server asks for it, and with `admin_key` for that one on its admin routes (both given by environment, out of
    the process list)."""

    def __init__(
        self,
        model: Path,
        port: int,
        log_dir: Path,
        api_key: str | None = API_KEY,
        args=(),
        admin_key: str | None = None,
    ) -> None:
        self.model, self.port, self.log = model, port, log_dir / f"engine-{port}.log"
        self.api_key, self.admin_key, self.args = api_key, admin_key, list(args)
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, model: Path | None = None) -> "EngineServer":
        self.model = model or self.model
        cmd = [sys.executable, "-m", "leagues.cli", "serve", "--model", str(self.model), "--port", str(self.port)]
        cmd += ["--engine_process", "false"]
        keys = {"LEAGUES_API_KEY": self.api_key, "LEAGUES_ADMIN_KEY": self.admin_key}
        env = {**os.environ, **{name: key for name, key in keys.items() if key}}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*cmd, *self.args], stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self) -> None:
        wait_ready(self.url, self.proc, self.log)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def update_weights(self, model: Path, version: int) -> None:
        body = {"model_path": str(model), "weight_version": version}
        key = self.admin_key or self.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else None
        response = httpx.post(self.url + "/update_weights_from_disk", json=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text


def request(seed: int, max_new_tokens: int = 8, **extra) -> dict:
    """A `/generate` body: a random prompt of 4 to 23 tokens, greedy, `max_new_tokens` tokens exactly."""
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 100) for _ in range(rng.randrange(4, 24))]
    params = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    return {"input_ids": prompt, "sampling_params": params, **extra}
