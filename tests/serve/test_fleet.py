"""The fleet against real engine server processes on the loopback: balancing, affinity, retries when a
replica dies mid-burst, quarantine, version-gated rejoin, weight updates, 503s, and the fleet as an engine
client (`FleetClient`).

Replicas are `leagues serve` processes on the tiny MoE, behind an API key (the fleet sends it); the fleet
runs in-process. Everything talks HTTP to separate processes, so killing a replica is a real SIGKILL.
"""

import asyncio
import time

import httpx
import pytest

from leagues.serve.fleet import Fleet, FleetConfig, FleetError, ReplicaState, engine_urls
from leagues.serve.fleet_client import FleetClient
from leagues.types import SamplingParams
from tests.serve.engines import API_KEY, AUTH, EngineServer, free_port, request

HEALTH_INTERVAL = 0.2


async def wait_until(condition, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def served(fleet: Fleet) -> list[int]:
    return [r.num_served for r in fleet.replicas.values()]


# --- policies without a network ------------------------------------------------------------------


def test_urls_config_and_affinity_keys():
    assert engine_urls("a:1, http://b:2/") == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError, match="duplicate"):
        engine_urls(["a:1", "http://a:1"])
    with pytest.raises(ValueError, match="max_failures"):
        FleetConfig(max_failures=0)
    fleet = Fleet(["a:1", "b:2"], FleetConfig(affinity_prefix_len=4))
    assert fleet.affinity_key({"session_id": "s", "rid": "x/1"}) == "session:s"
    assert fleet.affinity_key({"rid": "episode-7/turn-2"}) == "session:episode-7"
    same = fleet.affinity_key({"input_ids": [1, 2, 3, 4, 5]})
    assert same == fleet.affinity_key({"input_ids": [1, 2, 3, 4, 9, 9]}) != fleet.affinity_key({"input_ids": [1, 2]})
    assert fleet.affinity_key({"input_ids": [[1, 2], [3, 4]]}) is None


def test_choose_least_outstanding_and_bounded_affinity():
    fleet = Fleet(["a:1", "b:2"], FleetConfig(affinity_max_imbalance=2))
    a, b = fleet.replicas.values()
    a.outstanding, b.outstanding = 3, 1
    assert fleet.choose(None) is b
    assert fleet.choose("k") is b  # first sight: least outstanding, remembered
    b.outstanding = 3  # a is less busy now, but within the bound: the key sticks to b
    assert fleet.choose("k") is b
    b.outstanding = 6  # beyond the bound: least outstanding wins and the key moves
    assert fleet.choose("k") is a and fleet.affinity["k"] == a.url
    a.state = ReplicaState.QUARANTINED
    assert fleet.choose("k") is b  # quarantined replicas get nothing, affinity or not
    b.state = ReplicaState.QUARANTINED
    assert fleet.choose("k") is None


def test_rejoin_waits_for_the_fleet_version():
    fleet = Fleet(["a:1", "b:2"])
    a, b = fleet.replicas.values()
    b.weight_version = 3
    fleet._saw_version(b)
    a.state, a.weight_version = ReplicaState.QUARANTINED, 2
    fleet._maybe_rejoin(a)
    assert a.state == ReplicaState.QUARANTINED and "the fleet is at 3" in a.reason  # highest version seen
    fleet.set_weight_version(2)  # the RL loop's word wins over the highest version seen
    fleet._maybe_rejoin(a)
    assert a.state == ReplicaState.HEALTHY and fleet.weight_version == 2


def test_weight_updates_skip_the_dead_and_catch_restarted_engines_up():
    """The weights go to every replica that answers its check (quarantined ones too, which then rejoin at once);
    a replica that fails its update, or a healthy one that did not answer, is quarantined; a fleet where none
    took them raises. Targets carry the engines' key and say which ones do not serve the fleet's weights."""
    fleet = Fleet(["a:1", "b:2", "c:3"], FleetConfig(max_failures=3, api_key="k"))
    a, b, c = fleet.replicas.values()
    checks = {a.url: (0, None), b.url: (None, "ConnectError"), c.url: (0, None)}

    async def probe(replica):
        return checks[replica.url]

    fleet._probe = probe
    loaded = []

    def update(version: int):
        targets = asyncio.run(fleet.weight_targets())
        failures = {t.url: RuntimeError("weight update refused") for t in targets if t.url == c.url}
        loaded[:] = [t.url for t in targets if t.url not in failures]
        checks.update({url: (version, None) for url in loaded})  # they answer with the new weights from now on
        return targets, fleet.weights_updated(version, targets, failures)

    targets, metrics = update(1)
    assert [t.url for t in targets] == [a.url, c.url] and loaded == [a.url] and fleet.weight_version == 1
    assert all(t.headers == {"Authorization": "Bearer k"} and not t.rejoining for t in targets)
    # b did not answer (one failure: still healthy) and so missed the update; c refused it
    assert b.state == c.state == ReplicaState.QUARANTINED and "refused" in c.reason
    assert b.reason == "missed weight version 1: its health check failed: ConnectError"
    assert metrics == {"fleet/updated": 1.0, "fleet/healthy": 1.0, "fleet/replicas": 3.0}
    checks[b.url] = (0, None)  # b restarts, at the weights it started with
    asyncio.run(fleet.check_health())
    assert b.state == ReplicaState.QUARANTINED and "weight version 0; the fleet is at 1" in b.reason
    checks[c.url] = (None, "ConnectError")
    targets, metrics = update(2)
    assert [(t.url, t.rejoining) for t in targets] == [(a.url, False), (b.url, True)]
    assert metrics["fleet/updated"] == 2.0 and b.state == ReplicaState.HEALTHY and b.weight_version == 2
    checks[a.url] = checks[b.url] = (None, "ConnectError")
    with pytest.raises(FleetError, match="no engine took weight version 3"):
        update(3)


def test_fleet_client_without_a_healthy_engine_fails_its_samples():
    client = FleetClient(Fleet([f"http://127.0.0.1:{free_port()}"], FleetConfig(max_failures=1, connect_timeout=1)))
    params = SamplingParams(temperature=0, max_new_tokens=4)
    with pytest.raises(ConnectionError, match="HTTP 503: no healthy engine replica"):
        asyncio.run(client.generate([5, 17, 33], params))
    assert client.num_retried == 0


# --- against engine processes ------------------------------------------------------------------


def test_no_healthy_replica_is_503():
    async def main():
        cfg = FleetConfig(max_failures=1, connect_timeout=1)
        async with Fleet([f"http://127.0.0.1:{free_port()}"], cfg) as fleet:
            with pytest.raises(FleetError) as err:
                await fleet.generate(request(0))
            assert err.value.status == 503 and "no healthy engine replica" in err.value.body["error"]["message"]
            assert fleet.info()["replicas"][0]["state"] == "quarantined"
        with pytest.raises(FleetError, match="no replicas"):
            await Fleet([]).generate(request(0))

    asyncio.run(main())


def test_least_outstanding_spreads_and_affinity_sticks(replicas):
    async def main():
        async with Fleet([e.url for e in replicas], FleetConfig(affinity_prefix_len=8, api_key=API_KEY)) as fleet:
            outs = await asyncio.gather(*(fleet.generate(request(i)) for i in range(20)))
            assert all(len(o["output_ids"]) == 8 for o in outs)
            assert min(served(fleet)) >= 5, served(fleet)  # distinct prompts: spread by outstanding
            for key in ({"session_id": "episode-1"}, {"rid": "episode-2/turn"}):
                before = served(fleet)
                for turn in range(6):
                    extra = {**key, "rid": f"{key['rid']}-{turn}"} if "rid" in key else key
                    await fleet.generate(request(100 + turn, **extra))
                delta = sorted(s - b for s, b in zip(served(fleet), before, strict=True))
                assert delta == [0, 6], (key, delta)  # every turn of the session on one replica
            prefix = list(range(10, 18))
            before = served(fleet)
            for i in range(6):  # prompts sharing their first 8 tokens follow each other
                await fleet.generate({**request(300 + i, 4), "input_ids": prefix + [5 + i] * (i + 1)})
            assert sorted(s - b for s, b in zip(served(fleet), before, strict=True)) == [0, 6]

    asyncio.run(main())


def test_fleet_client_speaks_the_engine_client_protocol(replicas):
    async def main():
        client = FleetClient(Fleet([e.url for e in replicas], FleetConfig(api_key=API_KEY)))
        params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True, n=2)
        outs = await client.generate([5, 17, 33, 42], params)
        assert [len(o.token_ids) for o in outs] == [6, 6] and outs[0].token_ids == outs[1].token_ids
        version = await client.weight_version()  # the replicas' (another test of the module may have updated them)
        assert len(outs[0].logprobs) == 6 and version is not None and outs[0].weight_version == version
        with pytest.raises(ValueError, match="HTTP 400"):  # the request's fault: raised, never retried
            await client.generate([10**6], params)
        assert client.num_retried == 0 and await client.weight_version() == version
        await client.abort("no-such-request")  # best effort, on every healthy engine
        await client.aclose()

    asyncio.run(main())


def test_a_sleeping_replica_gets_no_traffic(replicas):
    """A replica that sleeps answers 503 on /health and /generate: the fleet retries its requests on the
    other replica (no client error), quarantines it at once, and takes it back once it wakes."""
    sleeper = replicas[0]

    async def main():
        cfg = FleetConfig(health_interval=HEALTH_INTERVAL, max_failures=3, api_key=API_KEY)
        async with Fleet([e.url for e in replicas], cfg) as fleet:
            replica = fleet.replicas[sleeper.url]
            async with httpx.AsyncClient(base_url=sleeper.url, headers=AUTH, timeout=30) as engine:
                assert (await engine.post("/release_memory_occupation")).status_code == 200
                try:
                    outs = await asyncio.gather(*(fleet.generate(request(i)) for i in range(40)))
                    assert all(len(o["output_ids"]) == 8 for o in outs)
                    await wait_until(lambda: replica.state == ReplicaState.QUARANTINED, what="quarantine")
                    await wait_until(lambda: replica.reason.startswith("not ready"), what="health check")
                    assert "asleep" in replica.reason
                    before = replica.num_served
                    await asyncio.gather(*(fleet.generate(request(i)) for i in range(10)))
                    assert replica.num_served == before  # no traffic while asleep
                finally:
                    assert (await engine.post("/resume_memory_occupation")).status_code == 200
            await wait_until(lambda: replica.state == ReplicaState.HEALTHY, what="rejoin after wake")

    asyncio.run(main())


@pytest.mark.slow
def test_replica_dies_mid_burst_then_rejoins_at_fleet_version(replicas, checkpoints):
    """Kill one replica while ~100 requests are in flight: all complete; it is quarantined; restarted at
    other weights it stays out until its weight version matches the fleet's."""
    dead, alive = replicas
    seed1 = checkpoints[1]

    async def main():
        cfg = FleetConfig(health_interval=HEALTH_INTERVAL, max_failures=2, max_retries=2, api_key=API_KEY)
        async with Fleet([e.url for e in replicas], cfg) as fleet:
            await _burst_with_a_kill(fleet, dead)
            replica = fleet.replicas[dead.url]
            await wait_until(lambda: replica.state == ReplicaState.QUARANTINED, what="quarantine")
            # the fleet moves to version 1; the restarted replica comes back at version 0
            await asyncio.to_thread(alive.update_weights, seed1, 1)
            await wait_until(lambda: fleet.weight_version == 1, what="fleet version 1")
            await asyncio.to_thread(lambda: dead.start(seed1).wait_ready())
            await wait_until(lambda: "weight version 0" in replica.reason, what="version gate")
            before = replica.num_served
            outs = await asyncio.gather(*(fleet.generate(request(i)) for i in range(10)))
            assert replica.state == ReplicaState.QUARANTINED and replica.num_served == before
            assert {o["meta_info"]["weight_version"] for o in outs} == {1}
            await asyncio.to_thread(dead.update_weights, seed1, 1)
            await wait_until(lambda: replica.state == ReplicaState.HEALTHY, what="rejoin")
            await asyncio.gather(*(fleet.generate(request(i)) for i in range(10)))
            assert replica.num_served > before  # traffic again
            assert fleet.info()["num_healthy"] == 2

    asyncio.run(main())


async def _burst_with_a_kill(fleet: Fleet, victim: EngineServer, num_requests: int = 100) -> None:
    """Requests arrive over ~1 s with different lengths; the victim is killed with requests in flight."""

    async def one(i: int) -> dict:
        await asyncio.sleep(i * 0.01)
        return await fleet.generate(request(i, max_new_tokens=4 + i % 29))

    tasks = [asyncio.create_task(one(i)) for i in range(num_requests)]
    replica = fleet.replicas[victim.url]
    await wait_until(lambda: sum(t.done() for t in tasks) >= 10 and replica.outstanding > 0, what="mid-burst")
    in_flight = replica.outstanding
    await asyncio.to_thread(victim.kill)
    outs = await asyncio.gather(*tasks)  # raises if any request failed
    assert in_flight > 0
    assert [len(o["output_ids"]) for o in outs] == [4 + i % 29 for i in range(num_requests)]
    assert replica.num_failed >= 1 and sum(served(fleet)) >= num_requests
