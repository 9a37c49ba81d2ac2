"""`leagues serve` end to end: real server processes on loopback with the built-in tiny MoE.

Two servers start once, in parallel: `open_url` (no keys) for the APIs, and `secured` (an API key and
an admin key, and a stream interval of 4 tokens) for auth, grouped streams and the weight update, which changes
its weights. Outputs are checked against an
in-process `Engine` on the same checkpoint: greedy tokens equal, logprobs within 1e-5.
"""

import asyncio
import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from leagues.engine import Engine, SamplingParams
from leagues.model import write_tiny_moe

API_KEY, ADMIN_KEY = "plain-key", "admin-key"
ENGINE_ARGS = ["--engine.num_blocks", "1024", "--engine.max_model_len", "96"]
PROMPT_IDS = [5, 17, 33, 42, 8, 64, 71]


def _launch(*args: str, engine_args: list[str] = ENGINE_ARGS) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "leagues.cli", "serve", "--port", "0", *engine_args, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())


def _wait_url(proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline, lines = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if m := re.search(r"listening on (http://\S+)", line):
            return m.group(1)
    proc.kill()
    raise RuntimeError("server did not start:\n" + "".join(lines))


@contextlib.contextmanager
def serving(*arg_lists: list[str], engine_args: list[str] = ENGINE_ARGS, timeout: float = 60):
    """`leagues serve` processes on loopback, one per argument list; yields their URLs, stops them after."""
    procs = [_launch(*args, engine_args=engine_args) for args in arg_lists]
    try:
        yield [_wait_url(p, timeout) for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def servers():
    with serving([], ["--api_key", API_KEY, "--admin_key", ADMIN_KEY, "--stream_interval", "4"]) as urls:
        yield urls


@pytest.fixture(scope="module")
def open_url(servers):
    return servers[0]


@pytest.fixture(scope="module")
def secured(servers):
    return servers[1]


@pytest.fixture(scope="module")
def local(tiny_path):
    engine = Engine(tiny_path, num_blocks=256)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(open_url):
    return openai.OpenAI(base_url=open_url + "/v1", api_key="unused")


GREEDY = dict(temperature=0, max_tokens=10)


# --- OpenAI client ---------------------------------------------------------------------------------


def test_chat_completion(client, local):
    messages = [{"role": "user", "content": "What is 2+3?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    prompt = local.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    (ref,) = local.generate([prompt], SamplingParams(temperature=0, max_new_tokens=10))
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.token_ids)


def test_completion_and_streaming_agree(client):
    full = client.completions.create(model="tiny", prompt="The quick brown fox", **GREEDY)
    chunks = list(client.completions.create(model="tiny", prompt="The quick brown fox", stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_stop_string_is_cut_in_stream_too(client):
    full = client.completions.create(model="tiny", prompt="abc", temperature=0, max_tokens=12)
    stop = full.choices[0].text[3:5]
    assert stop
    cut = client.completions.create(model="tiny", prompt="abc", temperature=0, max_tokens=12, stop=[stop])
    chunks = client.completions.create(
        model="tiny", prompt="abc", temperature=0, max_tokens=12, stop=[stop], stream=True
    )
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.index(stop)]
    assert "".join(c.choices[0].text for c in chunks) == cut.choices[0].text
    assert cut.choices[0].finish_reason == "stop"


def test_n_and_logprobs(client, local):
    out = client.completions.create(model="tiny", prompt=["ab", "cd"], n=3, temperature=1, seed=7, max_tokens=6)
    assert [c.index for c in out.choices] == list(range(6))
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        logprobs=True,
        top_logprobs=3,
        **GREEDY,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)
    comp = client.completions.create(model="tiny", prompt="xyz", logprobs=2, **GREEDY)
    lp = comp.choices[0].logprobs
    (ref,) = local.generate(["xyz"], SamplingParams(temperature=0, max_new_tokens=10))
    np.testing.assert_allclose(lp.token_logprobs, ref.logprobs, atol=1e-5)
    assert len(lp.top_logprobs) == len(lp.tokens) == len(ref.token_ids)


def test_models(client):
    (card,) = client.models.list().data
    assert card.id and card.object == "model"


# --- SGLang native --------------------------------------------------------------------------------


def test_generate_matches_in_process_engine(open_url, local):
    body = {
        "input_ids": PROMPT_IDS,
        "sampling_params": {"temperature": 0, "max_new_tokens": 8},
        "return_logprob": True,
        "return_routed_experts": True,
    }
    out = httpx.post(open_url + "/generate", json=body, timeout=30).json()
    params = SamplingParams(temperature=0, max_new_tokens=8, return_routed_experts=True)
    (ref,) = local.generate([PROMPT_IDS], params)
    meta = out["meta_info"]
    assert out["output_ids"] == ref.token_ids
    assert [t for _, t, _ in meta["output_token_logprobs"]] == ref.token_ids
    np.testing.assert_allclose([lp for lp, _, _ in meta["output_token_logprobs"]], ref.logprobs, atol=1e-5)
    assert meta["prompt_tokens"] == len(PROMPT_IDS) and meta["completion_tokens"] == len(ref.token_ids)
    assert meta["finish_reason"]["type"] in ("stop", "length") and meta["weight_version"] == 0
    routes = np.frombuffer(base64.b64decode(meta["routed_experts"]), np.int32).reshape(meta["routed_experts_shape"])
    np.testing.assert_array_equal(routes, ref.routed_experts.numpy())


def test_generate_batch_n_and_stream(open_url):
    body = {"text": ["ab", "cd"], "sampling_params": {"temperature": 0.8, "n": 2, "max_new_tokens": 5, "seed": 1}}
    outs = httpx.post(open_url + "/generate", json=body, timeout=30).json()
    assert len(outs) == 4 and all(o["meta_info"]["completion_tokens"] <= 5 for o in outs)
    single = {"text": "hello", "sampling_params": {"temperature": 0, "max_new_tokens": 6}}
    full = httpx.post(open_url + "/generate", json=single, timeout=30).json()
    with httpx.stream("POST", open_url + "/generate", json=single | {"stream": True}, timeout=30) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = httpx.Response(200, content=events[-2]).json()
    assert last["text"] == full["text"] and last["output_ids"] == full["output_ids"]
    assert last["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]


def test_stream_interval_sends_tokens_in_groups_and_the_same_answer(secured):
    """`--stream_interval 4`: every chunk but an output's last carries 4 new tokens or more, and the streams add up
    to the answers sent whole."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    single = {"input_ids": [5, 6, 7], "sampling_params": {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}}
    full = httpx.post(secured + "/generate", json=single, headers=headers, timeout=30).json()
    with httpx.stream("POST", secured + "/generate", json=single | {"stream": True}, headers=headers, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    counts = [e["meta_info"]["completion_tokens"] for e in events]
    assert counts[-1] == 10 and all(b - a >= 4 for a, b in zip([0, *counts[:-2]], counts[:-1], strict=True)), counts
    assert events[-1]["text"] == full["text"] and events[-1]["output_ids"] == full["output_ids"]
    client = openai.OpenAI(base_url=secured + "/v1", api_key=API_KEY)
    kwargs = dict(model="m", prompt="ab", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert "".join(pieces) == whole and 1 < len(pieces) <= 3, pieces  # 4 + 4 tokens, then the last 2 with the end
    chat = dict(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=10, temperature=0)
    chat["extra_body"] = {"ignore_eos": True}
    answer = client.chat.completions.create(**chat).choices[0].message.content
    chunks = [c.choices[0].delta.content for c in client.chat.completions.create(stream=True, **chat) if c.choices]
    assert "".join(c or "" for c in chunks) == answer and len([c for c in chunks if c]) <= 3, chunks


def test_info_health_and_abort(open_url):
    assert httpx.get(open_url + "/health").status_code == 200
    assert httpx.get(open_url + "/health_generate", timeout=30).status_code == 200
    info = httpx.get(open_url + "/get_server_info").json()
    assert isinstance(info["weight_version"], int) and info["engine_config"]["num_blocks"] == 1024
    assert httpx.get(open_url + "/get_model_info").json()["is_generation"] is True
    assert httpx.post(open_url + "/flush_cache").json()["success"] is True

    async def abort_one():
        async with httpx.AsyncClient(base_url=open_url, timeout=30) as c:
            body = {"input_ids": [5, 6], "rid": "long-one"}
            body["sampling_params"] = {"max_new_tokens": 80, "ignore_eos": True, "temperature": 0}
            task = asyncio.create_task(c.post("/generate", json=body))
            await asyncio.sleep(0.3)
            await c.post("/abort_request", json={"rid": "long-one"})
            return (await task).json()

    out = asyncio.run(abort_one())
    assert out["meta_info"]["finish_reason"]["type"] in ("abort", "length")


# --- errors ----------------------------------------------------------------------------------------

BAD = [
    ("/generate", {"sampling_params": {"temperature": 0}}, "text"),
    ("/generate", {"text": "a", "input_ids": [1]}, "text"),
    ("/generate", {"text": "a", "sampling_params": {"top_p": 0}}, "sampling_params.top_p"),
    ("/generate", {"text": "a", "sampling_params": {"n": 0}}, "sampling_params.n"),
    ("/generate", {"text": "a", "sampling_params": {"temprature": 1}}, "sampling_params.temprature"),
    ("/generate", {"input_ids": [10**6]}, "input_ids"),
    ("/generate", {"input_ids": list(range(5, 100)) * 2}, "input_ids"),
    ("/generate", {"text": "a", "rid": ["x", "y"]}, "rid"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/abort_request", {}, "rid"),
    ("/update_weights_from_disk", {"model_path": "/nonexistent"}, "model_path"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD)
def test_bad_requests_name_the_field(open_url, path, body, field):
    r = httpx.post(open_url + path, json=body, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    error = r.json().get("error") or {}
    message = error.get("message") or r.json().get("message", "")
    assert field in message or error.get("param") == field, r.text


def test_malformed_json_and_huge_body(open_url):
    r = httpx.post(open_url + "/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = httpx.post(open_url + "/generate", json={"text": "a" * (33 * 2**20)}, timeout=30)
    assert r.status_code == 413


def test_a_small_body_cannot_start_a_flood_of_sequences(open_url):
    """n is capped, and so is prompts x n: 3,000 prompts x n 64 would be 192,000 sequences from a 32 KB body."""
    body = {"input_ids": [[5, 6]] * 3000, "sampling_params": {"n": 64, "max_new_tokens": 1}}
    r = httpx.post(open_url + "/generate", json=body, timeout=30)
    assert r.status_code == 400 and "over 4096 sequences" in r.text
    assert httpx.get(open_url + "/health").status_code == 200


# --- auth and weights ------------------------------------------------------------------------------


def test_auth(secured):
    plain, admin = {"Authorization": f"Bearer {API_KEY}"}, {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.get(secured + "/health").status_code == 200
    assert httpx.get(secured + "/get_server_info").status_code == 401
    assert httpx.get(secured + "/get_server_info", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(secured + "/get_server_info", headers=plain).status_code == 200
    assert httpx.get(secured + "/metrics", headers=admin).status_code == 200
    for path in ("/update_weights_from_disk", "/release_memory_occupation", "/resume_memory_occupation"):
        assert httpx.post(secured + path, json={}, headers=plain).status_code == 403
        assert httpx.post(secured + path, json={}).status_code == 401
    assert httpx.post(secured + "/release_memory_occupation", headers=admin, timeout=30).json()["success"]
    assert httpx.post(secured + "/resume_memory_occupation", headers=admin, timeout=30).json()["success"]
    # cache flushes and aborting everyone's requests are admin work; aborting one's own request is not
    assert httpx.post(secured + "/flush_cache", headers=plain).status_code == 403
    assert httpx.post(secured + "/flush_cache", headers=admin, timeout=30).json()["success"]
    assert httpx.post(secured + "/abort_request", json={"abort_all": True}, headers=plain).status_code == 403
    assert httpx.post(secured + "/abort_request", json={"abort_all": True}, headers=admin).status_code == 200
    assert httpx.post(secured + "/abort_request", json={"rid": "mine"}, headers=plain).status_code == 200
    client = openai.OpenAI(base_url=secured + "/v1", api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_update_weights_from_disk(secured, tmp_path_factory):
    second = write_tiny_moe(tmp_path_factory.mktemp("second"), seed=1)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"input_ids": PROMPT_IDS, "sampling_params": {"temperature": 0, "max_new_tokens": 8}, "return_logprob": True}
    before = httpx.post(secured + "/generate", json=body, headers=headers, timeout=30).json()
    r = httpx.post(
        secured + "/update_weights_from_disk",
        json={"model_path": str(second), "weight_version": 3},
        headers=headers,
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["success"], r.text
    after = httpx.post(secured + "/generate", json=body, headers=headers, timeout=30).json()
    with contextlib.closing(Engine(second, num_blocks=256)) as ref_engine:
        (ref,) = ref_engine.generate([PROMPT_IDS], SamplingParams(temperature=0, max_new_tokens=8))
    assert after["output_ids"] == ref.token_ids != before["output_ids"]
    np.testing.assert_allclose(
        [lp for lp, _, _ in after["meta_info"]["output_token_logprobs"]], ref.logprobs, atol=1e-5
    )
    assert after["meta_info"]["weight_version"] == 3
    assert httpx.get(secured + "/get_server_info", headers=headers).json()["weight_version"] == 3


# --- load, metrics, fuzzing ------------------------------------------------------------------------


def test_512_concurrent_requests(open_url):
    async def run():
        limits = httpx.Limits(max_connections=512)
        async with httpx.AsyncClient(base_url=open_url, timeout=120, limits=limits) as c:
            bodies = [
                {"input_ids": [5 + i % 90, 7, 9 + i % 50], "sampling_params": {"max_new_tokens": 4, "seed": i}}
                for i in range(512)
            ]
            return await asyncio.gather(*(c.post("/generate", json=b) for b in bodies), return_exceptions=True)

    responses = asyncio.run(run())
    errors = [r for r in responses if isinstance(r, Exception) or r.status_code != 200]
    assert not errors, errors[:3]
    assert all(r.json()["meta_info"]["completion_tokens"] >= 1 for r in responses)


def test_metrics_after_traffic(open_url):
    text = httpx.get(open_url + "/metrics").text
    for name in (
        'leagues_http_requests_total{endpoint="/generate",status="200"}',
        "leagues_prompt_tokens_total",
        "leagues_generation_tokens_total",
        "leagues_num_requests_waiting",
        "leagues_kv_cache_blocks_used",
        "leagues_prefix_cache_hit_rate",
        "leagues_time_to_first_token_seconds_count",
        "leagues_inter_token_latency_seconds_count",
        "leagues_e2e_request_latency_seconds_count",
    ):
        assert name in text
    generated = float(re.search(r"^leagues_generation_tokens_total (\S+)", text, re.M).group(1))
    assert generated >= 512
    value = lambda name: float(re.search(rf"^{name} (\S+)", text, re.M).group(1))  # noqa: E731
    assert value("leagues_engine_time_to_first_token_seconds_count") >= 512
    # each sample's time to first token in the server covers its request's time in the engine
    engine_share = value("leagues_engine_time_to_first_token_seconds_sum")
    assert 0 < engine_share <= value("leagues_time_to_first_token_seconds_sum")
    # and the hops between the front and the engine's loop, one of each a prompt, make up the rest of it
    hops = [value(f"leagues_{hop}_seconds_sum") for hop in ("front_to_engine", "engine_to_front")]
    assert value("leagues_front_to_engine_seconds_count") == value("leagues_engine_to_front_seconds_count") >= 512
    assert min(hops) >= 0 and engine_share + sum(hops) <= value("leagues_time_to_first_token_seconds_sum") + 1e-6


@pytest.fixture(scope="module")
def api_schema(open_url):
    schema = schemathesis.openapi.from_url(open_url + "/openapi.json")
    # sleeping the engine mid-run would stall the other operations (test_auth covers these two), and a
    # generated body could make the server wait 30 min to join a weight group (tests/sync covers those)
    skip = ["/release_memory_occupation", "/resume_memory_occupation", "/init_weights_update_group"]
    skip += ["/update_weights_from_distributed", "/destroy_weights_update_group"]
    return schema.exclude(path=skip)


def test_schemathesis_no_server_errors(api_schema, open_url):
    """Cases generated from the app's own OpenAPI schema (valid and invalid bodies): never a 5xx."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(checks=[not_a_server_error], timeout=30)

        check()
    counts = re.findall(
        r'^leagues_http_requests_total\{endpoint="([^"]*)",status="(\d+)"\} (\S+)', _metrics(open_url), re.M
    )
    assert sum(float(n) for _, _, n in counts) > 60
    assert not [c for c in counts if c[1].startswith("5")], counts


def _metrics(url: str) -> str:
    return httpx.get(url + "/metrics").text


def test_distributed_weight_routes_are_wired(open_url, secured):
    """The protocol itself is tested in tests/sync; here: reachable, malformed bodies are 400, admin only."""
    for path in ("/init_weights_update_group", "/update_weights_from_distributed", "/destroy_weights_update_group"):
        r = httpx.post(open_url + path, json={"group_name": 3}, timeout=30)
        assert r.status_code == 400 and r.json()["success"] is False, r.text
        plain = {"Authorization": f"Bearer {API_KEY}"}
        assert httpx.post(secured + path, json={}, headers=plain).status_code == 403
