"""`leagues serve --fronts 2`: two HTTP front processes over one engine process, end to end on loopback with the
built-in tiny MoE (deterministic kernels, so greedy outputs do not depend on which requests share a step).

One server serves the module's tests in order; the last one kills a front and checks that the server stops whole.
"""

import asyncio
import json
import os
import re
import signal
import subprocess
import time

import httpx
import pytest

from leagues.cli.main import main
from tests.serve.test_server import _launch, _wait_url

ENGINE_ARGS = ["--engine.num_blocks", "512", "--engine.max_model_len", "160", "--engine.deterministic", "true"]
PROMPTS = [[5, 17, 33, 42, 8], [64, 71, 9], [12, 13, 14, 15]]


@pytest.fixture(scope="module")
def server():
    proc = _launch("--fronts", "2", engine_args=ENGINE_ARGS)
    try:
        url = _wait_url(proc, timeout=180)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _info(url: str) -> dict:
    with httpx.Client(timeout=30) as client:  # a fresh connection: the kernel picks its front
        return client.get(f"{url}/get_server_info").json()


def _generate(url: str, prompt: list[int], stream: bool, new_tokens: int = 12) -> list[int]:
    body = {
        "input_ids": prompt,
        "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True},
    }
    if not stream:
        r = httpx.post(f"{url}/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["output_ids"]
    last = None
    with httpx.stream("POST", f"{url}/generate", json=body | {"stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                last = line
    return json.loads(last[len("data: ") :])["output_ids"]


def _counter(text: str, endpoint: str, status: int) -> float:
    m = re.search(rf'^leagues_http_requests_total{{endpoint="{endpoint}",status="{status}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_connections_spread_over_both_fronts_and_one_engine(server):
    _, url = server
    infos = [_info(url) for _ in range(16)]
    assert len({i["front_pid"] for i in infos}) == 2, [i["front_pid"] for i in infos]
    assert len({i["engine_pid"] for i in infos}) == 1
    assert all(i["fronts"] == 2 for i in infos)


def test_every_front_serves_the_same_outputs_and_metrics_count_them_all(server):
    _, url = server
    before = httpx.get(f"{url}/metrics", timeout=30).text

    async def all_at_once():
        jobs = [
            asyncio.to_thread(_generate, url, prompt, stream)
            for _ in range(4)
            for prompt in PROMPTS
            for stream in (False, True)
        ]
        return await asyncio.gather(*jobs)

    outs = asyncio.run(all_at_once())
    by_prompt: dict[int, set] = {}
    for k, out in enumerate(outs):
        assert len(out) == 12
        by_prompt.setdefault((k // 2) % len(PROMPTS), set()).add(tuple(out))
    assert all(len(v) == 1 for v in by_prompt.values()), by_prompt  # streamed or not, whichever front
    after = httpx.get(f"{url}/metrics", timeout=30).text  # one front answers for both
    assert _counter(after, "/generate", 200) - _counter(before, "/generate", 200) == len(outs)


def test_abort_all_reaches_every_fronts_requests(server):
    _, url = server
    body = {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 150, "ignore_eos": True}}

    async def run():
        async def one():
            async with httpx.AsyncClient(timeout=120) as client:  # its own connection: either front
                return (await client.post(f"{url}/generate", json=body)).json()

        tasks = [asyncio.create_task(one()) for _ in range(6)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = await asyncio.to_thread(_info, url)
            if info["num_running"] + info["num_waiting"] == 6:
                break
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(timeout=30) as client:
            aborted = await client.post(f"{url}/abort_request", json={"abort_all": True})
        return aborted, await asyncio.gather(*tasks)

    aborted, answers = asyncio.run(run())
    assert aborted.status_code == 200 and "aborted 6 request" in aborted.text, aborted.text
    assert all(a["meta_info"]["finish_reason"]["type"] == "abort" for a in answers), answers


def test_sessions_need_one_front(server):
    _, url = server
    r = httpx.post(f"{url}/sessions", json={}, timeout=30)
    assert r.status_code == 501 and "--fronts 1" in r.json()["error"]["message"], r.text


def test_a_front_that_dies_stops_the_server(server):
    proc, url = server
    engine_pid, front_pid = _info(url)["engine_pid"], _info(url)["front_pid"]
    os.kill(front_pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "exited (code -9); stopping" in out, out
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and os.path.exists(f"/proc/{engine_pid}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{engine_pid}")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=5)


def test_several_fronts_need_the_engine_process(capsys):
    assert main(["serve", "--fronts", "2", "--engine_process", "false"]) == 2  # refused before anything starts
    err = capsys.readouterr().err
    assert "fronts" in err and "engine_process" in err, err
