"""The engine in a process of its own (`leagues.serve.engine_process`): the same outputs as in-process, its
calls and status, and no request or process left behind when either side dies.

The `EngineProcess` tests run a real child process (spawned) on the built-in tiny MoE; the lifecycle tests run
`leagues serve` (whose engine is in its own process by default) and kill one side.
"""

import os
import signal
import subprocess
import time

import httpx
import pytest
import torch

from leagues.engine import Engine, EngineConfig, SamplingParams
from leagues.serve.engine_process import EngineProcess, InProcess
from tests.serve.test_server import _launch, _wait_url

# deterministic: the child batches requests as they arrive over its pipe, the in-process engine as they are
# submitted; batch-invariant kernels make the logprobs independent of that (on the CPU too)
CONFIG = EngineConfig(num_blocks=256, max_model_len=128, seed=3, deterministic=True)
PROMPTS = [[5, 17, 33, 42, 8], [64, 71, 9], [12, 13, 14, 15, 16, 17, 18]]


@pytest.fixture(scope="module")
def child(tiny_moe_dir):
    engine = EngineProcess(tiny_moe_dir, CONFIG)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tiny_moe_dir():
    from leagues.cli.generate import resolve_model_dir

    return resolve_model_dir("tiny-moe")


def _sampled(engine, params: SamplingParams) -> tuple[list, dict]:
    streamed: dict[tuple[int, int], list[int]] = {}
    futures = []
    for k, prompt in enumerate(PROMPTS):

        def on_token(index, token_id, logprob, k=k):
            streamed.setdefault((k, index), []).append(token_id)

        futures.append(engine.submit(prompt, params, f"r{k}", on_token))
    return [o for f in futures for o in f.result(timeout=120)], streamed


def test_a_child_engine_gives_the_in_process_engines_outputs(child, tiny_moe_dir):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, n=2, seed=11, return_routed_experts=True)
    theirs, streamed = _sampled(child, params)
    local = Engine(tiny_moe_dir, config=CONFIG)
    try:
        mine, _ = _sampled(InProcess(local), params)
    finally:
        local.close()
    for a, b in zip(theirs, mine, strict=True):
        assert (a.request_id, a.index, a.token_ids, a.finish_reason) == (
            b.request_id,
            b.index,
            b.token_ids,
            b.finish_reason,
        )
        assert a.logprobs == b.logprobs  # batch-invariant kernels: bit for bit however the requests were batched
        assert torch.equal(a.routed_experts, b.routed_experts)
    for k, _ in enumerate(PROMPTS):  # every token was streamed, in order, before the request finished
        for index in range(params.n):
            assert streamed[(k, index)] == theirs[k * params.n + index].token_ids


def test_a_child_engine_checks_prompts_before_they_cross(child):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        child.submit([10**6], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="limit is 127"):
        child.submit([7] * 200, SamplingParams(max_new_tokens=2))
    long = child.submit([5, 6, 7], SamplingParams(max_new_tokens=100, ignore_eos=True), "dup")
    with pytest.raises(ValueError, match="already in flight"):
        child.submit([5, 6, 7], SamplingParams(max_new_tokens=2), "dup")
    child.abort("dup")
    assert long.result(timeout=60)[0].finish_reason == "abort"


def test_a_child_engines_calls_and_status(child, tmp_path):
    child.sleep()
    assert child.status().asleep and child.asleep
    child.wake()
    assert not child.status().asleep and child.status().alive
    version = child.weight_version
    with pytest.raises(ValueError, match="no .safetensors files"):  # checked in the child, raised here
        child.load_from_disk(tmp_path, 7)
    assert child.fresh_status().weight_version == version
    with pytest.raises(ValueError, match="unknown weight-group route"):
        child.weight_group("shutdown", {}, 1.0)
    child.flush_cache()
    before = child.fresh_status().stats["generated_tokens"]
    child.submit([5, 6], SamplingParams(max_new_tokens=3, ignore_eos=True)).result(timeout=60)
    assert child.fresh_status().stats["generated_tokens"] == before + 3


def test_a_bad_engine_config_fails_where_it_is_made(tiny_moe_dir):
    with pytest.raises(ValueError, match="compile_model"):
        EngineProcess(tiny_moe_dir, EngineConfig(num_blocks=256, compile_model="bogus"))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie is gone too (its parent has not reaped it yet)
            if f.read().split(")")[-1].split()[0] == "Z":
                return True
        time.sleep(0.1)
    return False


def test_a_dead_engine_process_fails_its_requests_and_health():
    proc = _launch()
    try:
        url = _wait_url(proc, timeout=120)
        pid = httpx.get(f"{url}/get_server_info", timeout=30).json()["engine_pid"]
        assert pid in _children(proc.pid)
        body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 80, "ignore_eos": True}}
        with (
            httpx.Client(base_url=url, timeout=60) as client,
            client.stream("POST", "/generate", json=body | {"stream": True}) as r,
        ):
            lines = r.iter_lines()
            next(lines)  # a token has come: the request is in the engine
            os.kill(pid, signal.SIGKILL)
            rest = "".join(lines)
        assert "exited" in rest and "-9" in rest, rest  # the stream ends with the engine's exit, not a hang
        assert httpx.get(f"{url}/health", timeout=30).status_code == 503
        r = httpx.post(f"{url}/generate", json=body, timeout=30)
        assert r.status_code >= 500 and "exited" in r.text, r.text
        assert proc.poll() is None  # the front lives on to say so
    finally:
        proc.kill()
        proc.wait()


def test_the_engine_process_ends_with_the_front():
    proc = _launch()
    try:
        _wait_url(proc, timeout=120)
        children = _children(proc.pid)
        assert children, "no engine process"
    finally:
        proc.kill()  # no shutdown: the engine sees its pipe close
        proc.wait()
    assert all(_gone(pid, timeout=30) for pid in children)
