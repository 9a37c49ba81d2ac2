"""`leagues serve` against clients that time out, disconnect, flood it or reach for admin work.

Real server processes on loopback with the built-in tiny MoE: `busy` (no keys, few sequences at a time,
short health timeout, small request limits) for cancellation, disconnects, sleep and limits; `keyed`
(both keys, bound beyond loopback, a weights root, a short weight-group timeout) for the admin routes.
Long requests are 1,000+ tokens, which take seconds on CPU, so a client can leave while they run.
"""

import asyncio
import contextlib
import re
import socket
import threading
import time

import httpx
import pytest

from leagues.cli.main import main
from leagues.cli.serve import _mount_sessions
from leagues.engine import Engine, SamplingParams
from leagues.model import write_tiny_moe
from leagues.serve.api_common import OFF_LOOP_BYTES
from leagues.serve.server import create_app
from tests.serve.test_server import serving

API_KEY, ADMIN_KEY = "user-key", "admin-key"
PLAIN, ADMIN = {"Authorization": f"Bearer {API_KEY}"}, {"Authorization": f"Bearer {ADMIN_KEY}"}
LONG = {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return root, write_tiny_moe(root / "second", seed=1), write_tiny_moe(tmp_path_factory.mktemp("outside"), seed=2)


@pytest.fixture(scope="module")
def servers(roots):
    busy = ["--engine.max_num_seqs", "2", "--engine.max_model_len", "2048", "--limits.health_generate_timeout", "0.5"]
    busy += [
        "--limits.max_request_tokens",
        "20000",
        "--limits.max_request_bytes",
        "100000",
        "--limits.max_sessions",
        "3",
    ]
    keyed = ["--host", "0.0.0.0", "--api_key", API_KEY, "--admin_key", ADMIN_KEY, "--weights_root", str(roots[0])]
    keyed += ["--engine.max_model_len", "256", "--limits.weight_group_timeout", "2"]
    with serving(busy, keyed, engine_args=["--engine.num_blocks", "1024"], timeout=90) as urls:
        yield urls


@pytest.fixture(scope="module")
def busy(servers):
    return servers[0]


@pytest.fixture(scope="module")
def keyed(servers):
    return servers[1]


def _info(url: str, headers=None) -> dict:
    return httpx.get(url + "/get_server_info", headers=headers, timeout=10).json()


def _settles(url: str, timeout: float = 10) -> dict:
    """The server's info once nothing runs, waits or is in flight (fails the test if that never happens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _info(url)
        if info["num_running"] == info["num_waiting"] == info["num_in_flight_requests"] == 0:
            return info
        time.sleep(0.1)
    raise AssertionError(f"requests still in the engine after {timeout} s: {info}")


async def _running(c: httpx.AsyncClient, at_least: int, timeout: float = 30) -> None:
    """Wait until the engine behind `c` runs `at_least` sequences (so what a test does next meets them)."""
    deadline = time.monotonic() + timeout
    while (await c.get("/get_server_info")).json()["num_running"] < at_least:
        assert time.monotonic() < deadline, f"fewer than {at_least} sequences running after {timeout} s"
        await asyncio.sleep(0.02)


def _serves(url: str, headers=None) -> None:
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    r = httpx.post(url + "/generate", json=body, headers=headers, timeout=30)
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 3, r.text


# --- an engine no client can break -------------------------------------------------------------------


def test_health_generate_timing_out_under_load_leaves_the_engine_serving(busy):
    async def run():
        async with httpx.AsyncClient(base_url=busy, timeout=120) as c:
            body = {"input_ids": [5, 6], "sampling_params": LONG | {"max_new_tokens": 600}}
            long = [asyncio.create_task(c.post("/generate", json=body)) for _ in range(2)]  # fill max_num_seqs
            await _running(c, 2)
            probes = await asyncio.gather(*(c.get("/health_generate") for _ in range(3)))
            return probes, await asyncio.gather(*long)

    probes, long = asyncio.run(run())
    assert all(p.status_code == 503 and "no token within 0.5 s" in p.text for p in probes), probes[0].text
    assert all(r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 600 for r in long)
    _settles(busy)
    _serves(busy)
    assert httpx.get(busy + "/health_generate", timeout=30).status_code == 200


LEAVING = [
    ("/generate", {"input_ids": [[5, 6], [7, 8]], "sampling_params": LONG}, False),
    ("/generate", {"input_ids": [[5, 6], [7, 8]], "sampling_params": LONG}, True),
    ("/v1/completions", {"prompt": ["ab", "cd"], "max_tokens": 1500, "ignore_eos": True}, False),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500}, True),
]


@pytest.mark.parametrize(("path", "body", "stream"), LEAVING)
def test_a_client_that_leaves_has_its_requests_aborted(busy, path, body, stream):
    """Non-streaming clients that time out and streaming ones that close: their engine requests stop."""
    body = body | {"stream": stream} | ({"ignore_eos": True} if path.endswith("chat/completions") else {})

    async def leave():
        async with httpx.AsyncClient(base_url=busy, timeout=30) as c:
            if stream:
                async with c.stream("POST", path, json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break  # the first token arrived; hang up
                return
            task = asyncio.create_task(c.post(path, json=body))
            await _running(c, 1)
            task.cancel()  # and the client closes its connections on the way out
            with contextlib.suppress(asyncio.CancelledError):
                await task

    before = _settles(busy)["stats"]["generated_tokens"]
    asyncio.run(leave())
    generated = _settles(busy, timeout=5)["stats"]["generated_tokens"] - before
    assert 0 < generated < 1500, generated  # stopped well before the 1,500 tokens each prompt asked for
    assert 'status="499"' in httpx.get(busy + "/metrics").text
    _serves(busy)


def test_cancelling_at_every_stage_over_http(busy):
    """Clients leave while their requests wait for a slot, during prefill, while decoding, and just as they
    finish; the engine keeps serving and ends with nothing in flight."""
    body = {"input_ids": [list(range(5, 600))], "sampling_params": LONG | {"max_new_tokens": 400}}

    async def run():
        async with httpx.AsyncClient(base_url=busy, timeout=60) as c:

            async def leave_after(delay: float):
                with contextlib.suppress(httpx.TimeoutException):
                    await c.post("/generate", json=body, timeout=httpx.Timeout(60, read=delay))

            await asyncio.gather(*(leave_after(d) for d in (0.001, 0.01, 0.05, 0.2, 0.5, 1.0, 2.0)))
            short = {"input_ids": [5], "sampling_params": {"max_new_tokens": 1}}
            await asyncio.gather(*(leave_after(0.001) for _ in range(4)), c.post("/generate", json=short))

    asyncio.run(run())
    _settles(busy)
    _serves(busy)


class CancelAt:
    """An `on_token` that cancels its request's future at token `k` (or raises at token `fail`)."""

    def __init__(self, k: int | None = None, fail: int | None = None) -> None:
        self.k, self.fail, self.seen, self.future = k, fail, 0, None

    def __call__(self, index: int, token: int, logprob: float) -> None:
        self.seen += 1
        if self.seen == self.k:
            self.future.cancel()
        if self.seen == self.fail:
            raise RuntimeError("a broken stream listener")


def test_cancelling_engine_futures_at_every_stage(tiny_path):
    """In process, without aborting: callers drop their futures while the engine sleeps, at the first token,
    mid decode, before the loop has seen them and after the end; a stream listener raises. The loop thread
    lives on, finishes every request, and the one with the broken listener completes."""
    engine = Engine(tiny_path, num_blocks=256, max_model_len=512)
    try:
        params = SamplingParams(temperature=0, max_new_tokens=60, ignore_eos=True)
        engine.sleep()  # requests wait, so every callback knows its future before tokens come
        asleep = engine.submit([5, 6], params)
        asleep.cancel()
        listeners = [CancelAt(k=1), CancelAt(k=30), CancelAt(fail=3)]
        for i, listener in enumerate(listeners):
            listener.future = engine.submit([5, 6, 7, i], params, on_token=listener)
        engine.wake()
        unseen = engine.submit([5, 6, 8], params)
        unseen.cancel()
        (out,) = engine.generate([[9, 9]], SamplingParams(max_new_tokens=2))
        finished = engine.submit([9, 9], SamplingParams(max_new_tokens=2))
        finished.result(timeout=60)
        finished.cancel()  # after the end: no effect
        broken = listeners[2].future.result(timeout=60)
        deadline = time.monotonic() + 60
        while engine.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.requests and engine.is_alive
        assert all(f.cancelled() for f in (asleep, unseen, listeners[0].future, listeners[1].future))
        assert len(broken[0].token_ids) == 60 and listeners[2].seen == 3  # dropped listener, finished request
        (out,) = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=4))
        assert len(out.token_ids) == 4
    finally:
        engine.close()


def test_request_ids_are_random(busy):
    body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 1}}
    ids = [httpx.post(busy + "/generate", json=body, timeout=30).json()["meta_info"]["id"] for _ in range(3)]
    assert len(set(ids)) == 3 and all(re.fullmatch(r"gen-[0-9a-f]{16}", i) for i in ids), ids


def test_limits_are_4xx(busy):
    flood = {"input_ids": [[5, 6]] * 3000, "sampling_params": {"n": 64, "max_new_tokens": 1}}
    r = httpx.post(busy + "/generate", json=flood, timeout=30)
    assert r.status_code == 400 and "over 4096 sequences" in r.text
    many_tokens = {"input_ids": [[5, 6]] * 8, "sampling_params": {"n": 8, "max_new_tokens": 1000}}
    r = httpx.post(busy + "/generate", json=many_tokens, timeout=30)
    assert r.status_code == 400 and "over the limit of 20000" in r.json()["error"]["message"], r.text
    r = httpx.post(busy + "/v1/completions", json={"prompt": "ab", "n": 32, "max_tokens": 1000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = httpx.post(busy + "/generate", json={"text": "a" * 200_000}, timeout=30)
    assert r.status_code == 413
    _settles(busy)


def test_a_sleeping_engine_is_not_ready_and_refuses_work(busy):
    body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}

    async def run():
        async with httpx.AsyncClient(base_url=busy, timeout=60) as c:
            running = asyncio.create_task(c.post("/generate", json=body))
            await _running(c, 1)
            assert (await c.post("/release_memory_occupation")).status_code == 200
            answers = [await c.get("/health"), await c.get("/health_generate")]
            answers += [await c.post("/generate", json=body), await c.post("/v1/completions", json={"prompt": "a"})]
            assert (await c.post("/resume_memory_occupation")).status_code == 200
            return answers, await running

    started = time.monotonic()
    answers, running = asyncio.run(run())
    assert [a.status_code for a in answers] == [503] * 4, [a.text for a in answers]
    assert all("asleep" in a.text for a in answers) and time.monotonic() - started < 20
    assert running.status_code == 200 and running.json()["meta_info"]["completion_tokens"] == 200  # paused, resumed
    _serves(busy)


def test_large_bodies_are_tokenized_off_the_event_loop(tiny_path):
    """A long text is encoded in a worker thread (the event loop serves the other clients meanwhile), a short one
    on the loop; either way a prompt over the context is a 400 naming the field. Agent sessions render a long
    conversation in a worker thread too."""
    engine = Engine(tiny_path, num_blocks=256, max_model_len=512)
    app = create_app(engine)
    _mount_sessions(app)
    tokenizer = app.state.leagues.engine.tokenizer
    threads, encode = [], tokenizer.encode

    def recording(*args, **kwargs):
        threads.append(threading.get_ident())
        return encode(*args, **kwargs)

    tokenizer.encode = recording

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            short = await c.post("/generate", json={"text": "ab", "sampling_params": {"max_new_tokens": 2}})
            long = await c.post("/generate", json={"text": "ab" * (OFF_LOOP_BYTES // 2), "sampling_params": {}})
            chat = {"messages": [{"role": "user", "content": "ab" * (OFF_LOOP_BYTES // 2)}], "max_tokens": 1}
            answers = [short, long, await c.post("/v1/chat/completions", json=chat)]
            for content in ("ab" * (OFF_LOOP_BYTES // 2), "hi"):  # a long first message, then a short one
                sid = (await c.post("/sessions", json={})).json()["id"]
                turn = {"messages": [{"role": "user", "content": content}], "max_tokens": 1}
                answers.append(await c.post(f"/sessions/{sid}/v1/chat/completions", json=turn))
            return threading.get_ident(), answers

    try:
        loop_thread, (short, long, chat, long_session, short_session) = asyncio.run(run())
    finally:
        engine.close()
    assert short.status_code == 200 and short_session.status_code == 200, (short.text, short_session.text)
    for r, field in ((long, "text"), (chat, "messages")):
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert "the limit is 511" in r.json()["error"]["message"], r.text
    assert long_session.status_code == 400 and "511" in long_session.text, long_session.text
    on_loop = [t == loop_thread for t in threads]
    assert on_loop == [True, False, False, False, True], on_loop


def test_a_caller_without_the_key_is_refused_before_its_body_is_read(keyed):
    """A body that never ends (Content-Length says a megabyte, 10 bytes come) gets its 401 at once."""
    host, port = keyed.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        sock.sendall((head + "Content-Length: 1000000\r\n\r\n" + '{"text": "').encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 401 ")


def _session_turn(url: str, sid: str, max_tokens: int = 2):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{url}/sessions/{sid}/v1/chat/completions", json=body, timeout=60)


def test_sessions_are_bounded_refused_asleep_and_aborted_with_the_rest(busy):
    """Agent sessions on `leagues serve`: at most `limits.max_sessions` open (3 here); none made and no turn taken
    while the engine sleeps (the turn then runs unchanged once it wakes); `abort_all` stops a sampling turn."""
    sessions = [httpx.post(busy + "/sessions", json={}, timeout=10) for _ in range(4)]
    assert [r.status_code for r in sessions] == [200, 200, 200, 429], [r.text for r in sessions]
    assert "sessions are open" in sessions[3].json()["error"]["message"]
    idle, sid, third = (r.json()["id"] for r in sessions[:3])
    closed = httpx.post(f"{busy}/sessions/{idle}/close", json={}, timeout=10)
    assert closed.status_code == 400 and "no sample" in closed.text  # but its place is free again
    assert httpx.post(f"{busy}/sessions/{third}/close", timeout=10).status_code == 400
    assert httpx.post(busy + "/release_memory_occupation", timeout=30).status_code == 200
    try:
        asleep = [httpx.post(busy + "/sessions", json={}, timeout=10), _session_turn(busy, sid)]
    finally:
        assert httpx.post(busy + "/resume_memory_occupation", timeout=30).status_code == 200
    assert [r.status_code for r in asleep] == [503, 503] and all("asleep" in r.text for r in asleep)
    turn = _session_turn(busy, sid)  # the same first request: the refused one left no trace in the session
    assert turn.status_code == 200 and turn.json()["usage"]["completion_tokens"] == 2, turn.text

    long = httpx.post(busy + "/sessions", json={}, timeout=10).json()["id"]

    async def abort_all():
        async with httpx.AsyncClient(base_url=busy, timeout=60) as c:
            sampling = asyncio.create_task(asyncio.to_thread(_session_turn, busy, long, 1500))
            await _running(c, 1)
            aborted = await c.post("/abort_request", json={"abort_all": True})
            return aborted, await sampling

    aborted, answer = asyncio.run(abort_all())
    assert aborted.status_code == 200 and "aborted 1 request" in aborted.text, aborted.text
    assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == "abort", answer.text
    assert answer.json()["usage"]["completion_tokens"] < 1500
    for s in (sid, long):
        assert httpx.post(f"{busy}/sessions/{s}/close", json={}, timeout=10).status_code == 200
    _settles(busy)


# --- admin --------------------------------------------------------------------------------------------

ADMIN_ROUTES = [
    ("/flush_cache", {}),
    ("/abort_request", {"abort_all": True}),
    ("/update_weights_from_disk", {"model_path": "/tmp"}),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1}),
    ("/update_weights_from_distributed", {"names": []}),
    ("/destroy_weights_update_group", {"group_name": "g"}),
    ("/release_memory_occupation", {}),
    ("/resume_memory_occupation", {}),
]


@pytest.mark.parametrize(("path", "body"), ADMIN_ROUTES)
def test_admin_routes_refuse_the_user_key(keyed, path, body):
    r = httpx.post(keyed + path, json=body, headers=PLAIN, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", r.text
    assert httpx.post(keyed + path, json=body, timeout=10).status_code == 401
    wrong = httpx.post(keyed + path, json=body, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer", wrong.text


def test_weights_load_only_from_under_the_root(keyed, roots):
    root, inside, outside = roots
    escape = root / "link"
    escape.symlink_to(outside, target_is_directory=True)
    for path in (outside, root / ".." / outside.name, escape, "/etc"):
        r = httpx.post(keyed + "/update_weights_from_disk", json={"model_path": str(path)}, headers=ADMIN)
        assert r.status_code == 403 and "outside the server's weights root" in r.text, r.text
    r = httpx.post(keyed + "/update_weights_from_disk", json={"model_path": str(inside)}, headers=ADMIN, timeout=60)
    assert r.status_code == 200 and r.json()["success"], r.text
    _serves(keyed, ADMIN)


def test_weight_group_joins_are_bounded_and_one_at_a_time(keyed):
    body = {"master_address": "127.0.0.1", "master_port": 9, "rank_offset": 1, "world_size": 2, "backend": "gloo"}

    async def run():
        async with httpx.AsyncClient(base_url=keyed, headers=ADMIN, timeout=60) as c:
            joins = [asyncio.create_task(c.post("/init_weights_update_group", json=body)) for _ in range(2)]
            await asyncio.sleep(0.3)
            flush = await c.post("/flush_cache")  # while a join waits: worker threads are not all taken
            done = await asyncio.gather(*joins)
            return *sorted(done, key=lambda r: r.status_code), flush

    started = time.monotonic()
    first, second, flush = asyncio.run(run())
    assert first.status_code == 200 and first.json()["success"] is False, first.text  # nobody to join
    assert time.monotonic() - started < 20  # weight_group_timeout 2 s, not 30 minutes
    assert second.status_code == 409 and flush.status_code == 200


def test_binding_beyond_loopback_needs_keys(monkeypatch, capsys):
    monkeypatch.delenv("LEAGUES_API_KEY", raising=False)
    monkeypatch.delenv("LEAGUES_ADMIN_KEY", raising=False)
    argv = ["serve", "--host", "0.0.0.0", "--port", "0"]
    assert main(argv) == 2  # the command as a user runs it, in this process: it stops before it binds
    err = capsys.readouterr().err
    assert "--api_key and --admin_key are not set" in err and "--insecure" in err, err
    assert main([*argv, "--insecure", "--model", "/nonexistent-model"]) == 2  # past the exposure check, to the model's
    err = capsys.readouterr().err
    assert "/nonexistent-model" in err and "not loopback and" in err, err
    assert "--insecure" not in err  # a warning only
