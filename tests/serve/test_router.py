"""The router against real engine server processes on the loopback: balancing, affinity, retries when a
replica dies mid-burst, quarantine, version-gated rejoin, 503s, and the `leagues router` server.

Replicas are `leagues serve` processes on the tiny MoE, behind an API key (the router sends it); the
router runs in-process, and once as a `leagues router` process. Everything talks HTTP to separate
processes, so killing a replica is a real SIGKILL.
"""

import asyncio
import http.server
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from leagues.serve.router import ReplicaState, Router, RouterConfig, RouterError, engine_urls

HEALTH_INTERVAL = 0.2
API_KEY = "router-test-key"
CLIENT_KEY, ROUTER_ADMIN_KEY = "router-client-key", "router-admin-key"
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


class EngineProcess:
    """One engine server process on a fixed port; `kill` and `start` again keep the port."""

    def __init__(self, model: Path, port: int, log_dir: Path) -> None:
        self.model, self.port, self.log = model, port, log_dir / f"engine-{port}.log"
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, model: Path | None = None) -> "EngineProcess":
        self.model = model or self.model
        cmd = [sys.executable, "-m", "leagues.cli", "serve", "--model", str(self.model), "--port", str(self.port)]
        with open(self.log, "ab") as log:  # the key goes by environment, out of the process list
            env = {**os.environ, "LEAGUES_API_KEY": API_KEY}
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self) -> None:
        wait_ready(self.url, self.proc, self.log)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def update_weights(self, model: Path, version: int) -> None:
        body = {"model_path": str(model), "weight_version": version}
        response = httpx.post(self.url + "/update_weights_from_disk", json=body, headers=AUTH, timeout=60)
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def checkpoints():
    """The tiny MoE (weights v0) and a second tiny checkpoint (other weights, served as version 1)."""
    from leagues.model import resolve_model_path, write_tiny_moe

    with tempfile.TemporaryDirectory(prefix="router-test-") as tmp:
        yield resolve_model_path("tiny-moe"), write_tiny_moe(Path(tmp) / "tiny-seed1", seed=1), Path(tmp)


@pytest.fixture(scope="module")
def fleet(checkpoints):
    """Two engine processes on the tiny MoE, started together; killed at the end of the module."""
    tiny, _, tmp = checkpoints
    engines = [EngineProcess(tiny, free_port(), tmp).start() for _ in range(2)]
    try:
        for engine in engines:
            engine.wait_ready()
        yield engines
    finally:
        for engine in engines:
            if engine.proc.poll() is None:
                engine.kill()


def request(seed: int, max_new_tokens: int = 8, **extra) -> dict:
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 100) for _ in range(rng.randrange(4, 24))]
    params = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    return {"input_ids": prompt, "sampling_params": params, **extra}


async def wait_until(condition, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def served(router: Router) -> list[int]:
    return [r.num_served for r in router.replicas.values()]


# --- policies without a network ------------------------------------------------------------------


def test_urls_config_and_affinity_keys():
    assert engine_urls("a:1, http://b:2/") == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError, match="duplicate"):
        engine_urls(["a:1", "http://a:1"])
    with pytest.raises(ValueError, match="max_failures"):
        RouterConfig(max_failures=0)
    router = Router(["a:1", "b:2"], RouterConfig(affinity_prefix_len=4))
    assert router.affinity_key({"session_id": "s", "rid": "x/1"}) == "session:s"
    assert router.affinity_key({"rid": "episode-7/turn-2"}) == "session:episode-7"
    same = router.affinity_key({"input_ids": [1, 2, 3, 4, 5]})
    assert same == router.affinity_key({"input_ids": [1, 2, 3, 4, 9, 9]}) != router.affinity_key({"input_ids": [1, 2]})
    assert router.affinity_key({"input_ids": [[1, 2], [3, 4]]}) is None


def test_choose_least_outstanding_and_bounded_affinity():
    router = Router(["a:1", "b:2"], RouterConfig(affinity_max_imbalance=2))
    a, b = router.replicas.values()
    a.outstanding, b.outstanding = 3, 1
    assert router.choose(None) is b
    assert router.choose("k") is b  # first sight: least outstanding, remembered
    b.outstanding = 3  # a is less busy now, but within the bound: the key sticks to b
    assert router.choose("k") is b
    b.outstanding = 6  # beyond the bound: least outstanding wins and the key moves
    assert router.choose("k") is a and router.affinity["k"] == a.url
    a.state = ReplicaState.QUARANTINED
    assert router.choose("k") is b  # quarantined replicas get nothing, affinity or not
    b.state = ReplicaState.QUARANTINED
    assert router.choose("k") is None


def test_rejoin_waits_for_the_fleet_version():
    router = Router(["a:1", "b:2"])
    a, b = router.replicas.values()
    b.weight_version = 3
    router._saw_version(b)
    a.state, a.weight_version = ReplicaState.QUARANTINED, 2
    router._maybe_rejoin(a)
    assert a.state == ReplicaState.QUARANTINED and "the fleet is at 3" in a.reason  # highest version seen
    router.set_weight_version(2)  # the RL loop's word wins over the highest version seen
    router._maybe_rejoin(a)
    assert a.state == ReplicaState.HEALTHY and router.weight_version == 2


# --- against engine processes --------------------------------------------------------------------


def test_router_beyond_loopback_needs_its_keys(monkeypatch):
    from leagues.cli import UsageError
    from leagues.cli.router import run_router

    for name in ("LEAGUES_ROUTER_API_KEY", "LEAGUES_ROUTER_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)
    cfg = RouterConfig(engines="http://127.0.0.1:1", host="0.0.0.0", client_api_key="k")
    with pytest.raises(UsageError, match="--admin_key unset.*--insecure"):
        run_router(cfg)


def test_no_healthy_replica_is_503():
    async def main():
        cfg = RouterConfig(max_failures=1, connect_timeout=1)
        async with Router([f"http://127.0.0.1:{free_port()}"], cfg) as router:
            with pytest.raises(RouterError) as err:
                await router.generate(request(0))
            assert err.value.status == 503 and "no healthy engine replica" in err.value.body["error"]["message"]
            assert router.info()["replicas"][0]["state"] == "quarantined"
        with pytest.raises(RouterError, match="no replicas"):
            await Router([]).generate(request(0))

    asyncio.run(main())


def test_least_outstanding_spreads_and_affinity_sticks(fleet):
    async def main():
        async with Router([e.url for e in fleet], RouterConfig(affinity_prefix_len=8, api_key=API_KEY)) as router:
            outs = await asyncio.gather(*(router.generate(request(i)) for i in range(20)))
            assert all(len(o["output_ids"]) == 8 for o in outs)
            assert min(served(router)) >= 5, served(router)  # distinct prompts: spread by outstanding
            for key in ({"session_id": "episode-1"}, {"rid": "episode-2/turn"}):
                before = served(router)
                for turn in range(6):
                    extra = {**key, "rid": f"{key['rid']}-{turn}"} if "rid" in key else key
                    await router.generate(request(100 + turn, **extra))
                delta = sorted(s - b for s, b in zip(served(router), before, strict=True))
                assert delta == [0, 6], (key, delta)  # every turn of the session on one replica
            prefix = list(range(10, 18))
            before = served(router)
            for i in range(6):  # prompts sharing their first 8 tokens follow each other
                await router.generate({**request(300 + i, 4), "input_ids": prefix + [5 + i] * (i + 1)})
            assert sorted(s - b for s, b in zip(served(router), before, strict=True)) == [0, 6]

    asyncio.run(main())


def test_a_sleeping_replica_gets_no_traffic(fleet):
    """A replica that sleeps answers 503 on /health and /generate: the router retries its requests on the
    other replica (no client error), quarantines it at once, and takes it back once it wakes."""
    sleeper = fleet[0]

    async def main():
        cfg = RouterConfig(health_interval=HEALTH_INTERVAL, max_failures=3, api_key=API_KEY)
        async with Router([e.url for e in fleet], cfg) as router:
            replica = router.replicas[sleeper.url]
            async with httpx.AsyncClient(base_url=sleeper.url, headers=AUTH, timeout=30) as engine:
                assert (await engine.post("/release_memory_occupation")).status_code == 200
                try:
                    outs = await asyncio.gather(*(router.generate(request(i)) for i in range(40)))
                    assert all(len(o["output_ids"]) == 8 for o in outs)
                    await wait_until(lambda: replica.state == ReplicaState.QUARANTINED, what="quarantine")
                    await wait_until(lambda: replica.reason.startswith("not ready"), what="health check")
                    assert "asleep" in replica.reason
                    before = replica.num_served
                    await asyncio.gather(*(router.generate(request(i)) for i in range(10)))
                    assert replica.num_served == before  # no traffic while asleep
                finally:
                    assert (await engine.post("/resume_memory_occupation")).status_code == 200
            await wait_until(lambda: replica.state == ReplicaState.HEALTHY, what="rejoin after wake")

    asyncio.run(main())


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


def test_router_server_process(fleet, checkpoints, rogue):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engines = ",".join(e.url for e in fleet)
    cmd = [sys.executable, "-m", "leagues.cli", "router", "--engines", engines, "--port", str(port)]
    log = checkpoints[2] / "router.log"
    with open(log, "wb") as out:
        options = ["--health-interval", str(HEALTH_INTERVAL), "--api-key", API_KEY]
        env = {**os.environ, "LEAGUES_ROUTER_API_KEY": CLIENT_KEY, "LEAGUES_ROUTER_ADMIN_KEY": ROUTER_ADMIN_KEY}
        proc = subprocess.Popen([*cmd, *options], stdout=out, stderr=out, env=env)
    try:
        wait_ready(url, proc, log)
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as client:
            _check_router_auth(url, rogue)
            _check_router_server(client, fleet)
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
    r = httpx.post(url + "/add_engine", json={"url": rogue}, headers=admin, timeout=30)
    assert r.status_code == 200 and r.json()["num_healthy"] == 3, r.text
    for i in range(6):  # least outstanding spreads them: the added engine gets some
        assert httpx.post(url + "/generate", json=request(i), headers=client, timeout=60).status_code == 200
    assert {"/health", "/get_server_info", "/generate"} <= {path for path, _ in Recorder.seen}
    assert all(auth is None for _, auth in Recorder.seen), Recorder.seen  # no key to an unconfigured URL
    assert httpx.post(url + "/remove_engine", json={"url": rogue}, headers=admin).status_code == 200


def _check_router_server(client: httpx.Client, fleet: list[EngineProcess]) -> None:
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
    assert client.post("/remove_engine", json={"url": fleet[0].url}, headers=admin).json()["num_replicas"] == 1
    # a URL the router was started with gets the engines' key back (else its checks would fail with 401)
    added = client.post("/add_engine", json={"url": fleet[0].url}, headers=admin).json()
    assert added["num_healthy"] == 2  # same version
    for engine in fleet:
        client.post("/remove_engine", json={"url": engine.url}, headers=admin)
    empty = client.post("/generate", json=request(0))
    assert empty.status_code == 503 and "no healthy engine replica" in empty.json()["error"]["message"]
    assert client.get("/health").status_code == 503


def test_replica_dies_mid_burst_then_rejoins_at_fleet_version(fleet, checkpoints):
    """Kill one replica while ~100 requests are in flight: all complete; it is quarantined; restarted at
    other weights it stays out until its weight version matches the fleet's."""
    dead, alive = fleet
    seed1 = checkpoints[1]

    async def main():
        cfg = RouterConfig(health_interval=HEALTH_INTERVAL, max_failures=2, max_retries=2, api_key=API_KEY)
        async with Router([e.url for e in fleet], cfg) as router:
            await _burst_with_a_kill(router, dead)
            replica = router.replicas[dead.url]
            await wait_until(lambda: replica.state == ReplicaState.QUARANTINED, what="quarantine")
            # the fleet moves to version 1; the restarted replica comes back at version 0
            await asyncio.to_thread(alive.update_weights, seed1, 1)
            await wait_until(lambda: router.weight_version == 1, what="fleet version 1")
            await asyncio.to_thread(lambda: dead.start(seed1).wait_ready())
            await wait_until(lambda: "weight version 0" in replica.reason, what="version gate")
            before = replica.num_served
            outs = await asyncio.gather(*(router.generate(request(i)) for i in range(10)))
            assert replica.state == ReplicaState.QUARANTINED and replica.num_served == before
            assert {o["meta_info"]["weight_version"] for o in outs} == {1}
            await asyncio.to_thread(dead.update_weights, seed1, 1)
            await wait_until(lambda: replica.state == ReplicaState.HEALTHY, what="rejoin")
            await asyncio.gather(*(router.generate(request(i)) for i in range(10)))
            assert replica.num_served > before  # traffic again
            assert router.info()["num_healthy"] == 2

    asyncio.run(main())


async def _burst_with_a_kill(router: Router, victim: EngineProcess, num_requests: int = 100) -> None:
    """Requests arrive over ~1 s with different lengths; the victim is killed with requests in flight."""

    async def one(i: int) -> dict:
        await asyncio.sleep(i * 0.01)
        return await router.generate(request(i, max_new_tokens=4 + i % 29))

    tasks = [asyncio.create_task(one(i)) for i in range(num_requests)]
    replica = router.replicas[victim.url]
    await wait_until(lambda: sum(t.done() for t in tasks) >= 10 and replica.outstanding > 0, what="mid-burst")
    in_flight = replica.outstanding
    await asyncio.to_thread(victim.kill)
    outs = await asyncio.gather(*tasks)  # raises if any request failed
    assert in_flight > 0
    assert [len(o["output_ids"]) for o in outs] == [4 + i % 29 for i in range(num_requests)]
    assert replica.num_failed >= 1 and sum(served(router)) >= num_requests
