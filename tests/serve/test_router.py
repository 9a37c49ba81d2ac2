"""`leagues router` as a process in front of real engine server processes: its clients need its keys, changing
the fleet needs the admin key, an added URL gets no secret, the engines' 4xx come back as they are, and an
empty fleet answers 503. The policies behind it are the fleet's (`test_fleet.py`).
"""

import asyncio
import http.server
import json
import os
import subprocess
import sys
import threading

import httpx
import pytest

from leagues.serve.router import RouterConfig
from tests.serve.engines import API_KEY, EngineServer, free_port, request, wait_ready

HEALTH_INTERVAL = 0.2
CLIENT_KEY, ROUTER_ADMIN_KEY = "router-client-key", "router-admin-key"


def test_router_beyond_loopback_needs_its_keys(monkeypatch):
    from leagues.cli import UsageError
    from leagues.cli.router import run_router

    for name in ("LEAGUES_ROUTER_API_KEY", "LEAGUES_ROUTER_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)
    cfg = RouterConfig(engines="http://127.0.0.1:1", host="0.0.0.0", client_api_key="k")
    with pytest.raises(UsageError, match="--admin_key unset.*--insecure"):
        run_router(cfg)


class Recorder(http.server.BaseHTTPRequestHandler):
    """An engine nobody configured: answers like one, and records what the router sends it."""

    seen: list[tuple[str, str | None]] = []

    def _answer(self, body: dict) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._answer({"weight_version": 0} if self.path == "/get_server_info" else {})

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._answer({"text": "", "output_ids": [1] * 8, "meta_info": {"weight_version": 0}})

    def log_message(self, *args):
        pass


@pytest.fixture
def rogue():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Recorder.seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_router_server_process(replicas, checkpoints, rogue):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engines = ",".join(e.url for e in replicas)
    cmd = [sys.executable, "-m", "leagues.cli", "router", "--engines", engines, "--port", str(port)]
    log = checkpoints[2] / "router.log"
    with open(log, "wb") as out:
        options = ["--fleet.health-interval", str(HEALTH_INTERVAL), "--fleet.api-key", API_KEY]
        options += ["--max-request-bytes", "100000"]
        env = {**os.environ, "LEAGUES_ROUTER_API_KEY": CLIENT_KEY, "LEAGUES_ROUTER_ADMIN_KEY": ROUTER_ADMIN_KEY}
        proc = subprocess.Popen([*cmd, *options], stdout=out, stderr=out, env=env)
    try:
        wait_ready(url, proc, log)
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as client:
            _check_router_auth(url, rogue)
            _check_router_server(client, replicas)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _check_router_auth(url: str, rogue: str) -> None:
    """Clients need the client key; changing the fleet needs the admin key; an added URL gets no key."""
    client, admin = {"Authorization": f"Bearer {CLIENT_KEY}"}, {"Authorization": f"Bearer {ROUTER_ADMIN_KEY}"}
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.post(url + "/generate", json=request(0)).status_code == 401
    engine_key = {"Authorization": f"Bearer {API_KEY}"}  # the engines' key opens nothing on the router
    assert httpx.post(url + "/generate", json=request(0), headers=engine_key).status_code == 401
    assert httpx.get(url + "/get_server_info").status_code == 401
    for path in ("/add_engine", "/remove_engine"):
        assert httpx.post(url + path, json={"url": rogue}).status_code == 401
        r = httpx.post(url + path, json={"url": rogue}, headers=client)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", r.text
    assert not Recorder.seen  # refused before the router ever looked at the URL
    big = httpx.post(url + "/generate", json={"text": "a" * 200_000}, headers=client)
    assert big.status_code == 413 and "larger than 100000 bytes" in big.text, big.text
    r = httpx.post(url + "/add_engine", json={"url": rogue}, headers=admin, timeout=30)
    assert r.status_code == 200 and r.json()["num_healthy"] == 3, r.text
    for i in range(6):  # least outstanding spreads them: the added engine gets some
        assert httpx.post(url + "/generate", json=request(i), headers=client, timeout=60).status_code == 200
    assert {"/health", "/get_server_info", "/generate"} <= {path for path, _ in Recorder.seen}
    assert all(auth is None for _, auth in Recorder.seen), Recorder.seen  # no key to an unconfigured URL
    assert httpx.post(url + "/remove_engine", json={"url": rogue}, headers=admin).status_code == 200


def _check_router_server(client: httpx.Client, replicas: list[EngineServer]) -> None:
    async def burst():
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60, headers=headers) as aclient:
            return await asyncio.gather(*(aclient.post("/generate", json=request(i)) for i in range(16)))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 and len(r.json()["output_ids"]) == 8 for r in responses)
    bad = client.post("/generate", json={**request(0), "sampling_params": {"temperature": -1}})
    assert 400 <= bad.status_code < 500  # the engine's 4xx, as it is, not retried
    info = client.get("/get_server_info").json()
    assert info["num_healthy"] == 2 and info["weight_version"] == 0
    assert all(r["num_served"] >= 3 and r["num_failed"] == 0 for r in info["replicas"]), info
    admin = {"Authorization": f"Bearer {ROUTER_ADMIN_KEY}"}
    assert client.post("/remove_engine", json={"url": replicas[0].url}, headers=admin).json()["num_replicas"] == 1
    # a URL the router was started with gets the engines' key back (else its checks would fail with 401)
    added = client.post("/add_engine", json={"url": replicas[0].url}, headers=admin).json()
    assert added["num_healthy"] == 2  # same version
    for engine in replicas:
        client.post("/remove_engine", json={"url": engine.url}, headers=admin)
    empty = client.post("/generate", json=request(0))
    assert empty.status_code == 503 and "no healthy engine replica" in empty.json()["error"]["message"]
    assert client.get("/health").status_code == 503
