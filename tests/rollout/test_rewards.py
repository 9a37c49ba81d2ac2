"""The reward scorer: built-ins over samples, user rewards by module and file spec (sync, async, group),
contained failures (exceptions, hangs, bad values) and strict mode, and a remote reward model served by a
real uvicorn server on loopback, including retries after a 500."""

import socket
import textwrap
import threading
import time

import pytest
import uvicorn
from fastapi import Body, FastAPI, HTTPException

from leagues.rollout.rewards import RewardConfig, RewardError, RewardScorer, RewardStats, load_user_reward, score_sync
from leagues.types import Sample, SampleStatus


def sample(response, label=None, prompt="q", group_id=0, **metadata):
    meta = {"prompt_text": prompt, "response_text": response, "label": label, **metadata}
    return Sample(prompt_ids=[1], response_ids=[2], group_id=group_id, status=SampleStatus.COMPLETED, metadata=meta)


def write_module(tmp_path, name, source):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def test_builtin_reward_scores_samples_and_skips_failed_ones():
    samples = [sample("42", 42), sample(" 41 ", 42), sample("x", 1)]
    samples[2].status, samples[2].reward, samples[2].metadata["error"] = SampleStatus.FAILED, -1.0, "engine: boom"
    stats = score_sync(samples, RewardConfig(name="exact"))
    assert stats == RewardStats(scored=2, failed=0, timed_out=0, skipped=1)
    assert [s.reward for s in samples] == [1.0, 0.0, -1.0]
    assert samples[1].status == SampleStatus.COMPLETED and samples[2].metadata["error"] == "engine: boom"


def test_user_reward_by_module_spec_with_kwargs(tmp_path, monkeypatch):
    write_module(
        tmp_path,
        "leagues_test_reward_mod",
        """
        def length(prompt, response, label, metadata, scale=1.0):
            return scale * len(response) + len(prompt) + metadata["bonus"]
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    samples = [sample("abc", prompt="pp", bonus=10), sample("", prompt="", bonus=0)]
    cfg = RewardConfig(name="leagues_test_reward_mod:length", reward_kwargs={"scale": 2.0})
    assert score_sync(samples, cfg).scored == 2
    assert [s.reward for s in samples] == [18.0, 0.0]


def test_user_reward_by_file_spec_async_and_loaded_once(tmp_path):
    path = write_module(
        tmp_path,
        "my_rewards",
        """
        import asyncio
        LOADS = [1]

        async def shout(prompt, response, label, metadata):
            await asyncio.sleep(0.01)
            return float(response.isupper())
        """,
    )
    spec = f"{path}:shout"
    samples = [sample("HI"), sample("hi")]
    with RewardScorer(RewardConfig(name=spec)) as scorer:
        assert scorer.score_sync(samples).scored == 2
    assert [s.reward for s in samples] == [1.0, 0.0]
    load_user_reward(spec).__globals__["LOADS"].append(2)
    assert load_user_reward(spec).__globals__["LOADS"] == [1, 2]  # the file was executed once


def test_group_reward_is_called_once_per_group(tmp_path):
    path = write_module(
        tmp_path,
        "group_rewards",
        """
        CALLS = []

        def longest(prompts, responses, labels, metadatas):
            CALLS.append(list(responses))
            best = max(len(r) for r in responses)
            return [float(len(r) == best) for r in responses]
        """,
    )
    samples = [sample("a", group_id=0), sample("bb", group_id=1), sample("ccc", group_id=0), sample("d", group_id=1)]
    stats = score_sync(samples, RewardConfig(name=f"{path}:longest", group=True))
    assert stats.scored == 4 and [s.reward for s in samples] == [0.0, 1.0, 1.0, 0.0]
    assert sorted(load_user_reward(f"{path}:longest").__globals__["CALLS"]) == [["a", "ccc"], ["bb", "d"]]


def test_bad_specs_name_the_spec(tmp_path):
    write_module(tmp_path, "has_value", "VALUE = 3\n")
    cases = {
        "leagues_no_such_module_xyz:f": "no module named 'leagues_no_such_module_xyz'",
        f"{tmp_path}/missing.py:f": "file not found",
        f"{tmp_path}/has_value.py:nope": "has no attribute 'nope'",
        f"{tmp_path}/has_value.py:VALUE": "not a function",
        ":f": "expected 'pkg.module:function'",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            RewardScorer(RewardConfig(name=spec))
        assert repr(spec) in str(info.value)
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        RewardConfig(name="nope")
    with pytest.raises(ValueError, match="group"):
        RewardConfig(name="math", group=True)
    with pytest.raises(ValueError, match="url"):
        RewardConfig(name="remote")


FLAKY = """
import asyncio, time

def sync_fn(prompt, response, label, metadata):
    if response == "boom":
        raise ValueError("boom")
    if response == "hang":
        time.sleep(2)
    return {"nan": float("nan"), "text": "abc"}.get(response, 1.0)

async def async_fn(prompt, response, label, metadata):
    if response == "hang":
        await asyncio.sleep(30)
    return sync_fn(prompt, response, label, metadata)
"""


@pytest.mark.parametrize("fn", ["sync_fn", "async_fn"])
def test_failures_are_contained(tmp_path, fn):
    path = write_module(tmp_path, "flaky", FLAKY)
    samples = [sample("ok"), sample("boom"), sample("hang"), sample("nan"), sample("text"), sample("ok")]
    del samples[5].metadata["response_text"]
    start = time.monotonic()
    stats = score_sync(samples, RewardConfig(name=f"{path}:{fn}", timeout_s=0.5))
    assert time.monotonic() - start < 1.5  # the hanging call is abandoned, not waited for
    assert stats == RewardStats(scored=1, failed=5, timed_out=1, skipped=0)
    assert [s.status for s in samples] == [SampleStatus.COMPLETED] + [SampleStatus.FAILED] * 5
    assert [s.reward for s in samples] == [1.0] + [0.0] * 5
    errors = [s.metadata.get("error") for s in samples]
    assert errors[:3] == [
        None,
        "reward: ValueError: boom",
        "reward: TimeoutError: reward took longer than timeout_s=0.5",
    ]
    assert errors[3] == "reward: ValueError: reward must be finite, got nan"
    assert errors[4] == "reward: TypeError: reward must be a number, got str 'abc'"
    assert "KeyError" in errors[5] and "response_text" in errors[5]


def test_a_hung_call_keeps_its_thread_and_later_calls_do_not_wait_for_it(tmp_path):
    """Sync rewards run on daemon threads kept between calls: a call abandoned by its timeout still holds its
    thread, so the next batch's calls run on others and finish at once."""
    path = write_module(tmp_path, "flaky_pool", FLAKY)
    cfg = RewardConfig(name=f"{path}:sync_fn", timeout_s=0.3)
    assert score_sync([sample("hang")], cfg).timed_out == 1
    start = time.monotonic()
    for _ in range(3):  # batches back to back while the hung call sleeps on
        stats = score_sync([sample("ok") for _ in range(8)], cfg)
        assert stats == RewardStats(scored=8, failed=0, timed_out=0, skipped=0)
    assert time.monotonic() - start < 1.0


def test_strict_mode_raises_naming_the_sample(tmp_path):
    path = write_module(tmp_path, "flaky_strict", FLAKY)
    samples = [sample("ok"), sample("ok"), sample("boom")]
    with pytest.raises(RewardError, match="failed for sample 2: ValueError: boom"):
        score_sync(samples, RewardConfig(name=f"{path}:sync_fn", strict=True))


def test_failing_group_call_fails_the_whole_group(tmp_path):
    path = write_module(
        tmp_path,
        "group_flaky",
        """
        def fn(prompts, responses, labels, metadatas):
            if "boom" in responses:
                raise RuntimeError("group boom")
            if "short" in responses:
                return [1.0]
            return [float("nan") if r == "nan" else 0.5 for r in responses]
        """,
    )
    groups = [["a", "boom"], ["b", "short"], ["c", "nan"]]
    samples = [sample(r, group_id=g) for g, rs in enumerate(groups) for r in rs]
    stats = score_sync(samples, RewardConfig(name=f"{path}:fn", group=True))
    assert stats == RewardStats(scored=1, failed=5, timed_out=0, skipped=0)
    expected = [
        "reward: RuntimeError: group boom",
        "reward: RuntimeError: group boom",
        "reward: TypeError: group reward must return a list of 2 numbers",
        "reward: TypeError: group reward must return a list of 2 numbers",
        "",
        "reward: ValueError: reward must be finite",
    ]
    assert [s.metadata.get("error", "")[: len(e)] for s, e in zip(samples, expected, strict=True)] == expected
    assert samples[4].reward == 0.5


# ---------------------------------------------------------------------------------------------------
# remote reward model on a real loopback server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reward_app(calls: dict) -> FastAPI:
    app = FastAPI()

    @app.post("/score")
    def score(body: dict = Body(...)):  # noqa: B008
        calls[body["prompt"]] = calls.get(body["prompt"], 0) + 1
        if body["prompt"] == "flaky" and calls["flaky"] == 1:
            raise HTTPException(500, "try again")
        if body["prompt"] == "down":
            raise HTTPException(503, "down")
        if body["prompt"] == "bad":
            raise HTTPException(422, "bad request")
        reward = float(body["response"] == str(body["label"])) + body["metadata"].get("bonus", 0)
        return {"reward": reward} if body["prompt"] != "bare" else reward

    return app


@pytest.fixture(scope="module")
def server():
    calls: dict = {}
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(reward_app(calls), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", calls
    server.should_exit = True
    thread.join(timeout=10)


def test_remote_reward(server):
    url, calls = server
    samples = [
        sample("42", 42, prompt="q1", bonus=0.5),
        sample("41", 42, prompt="bare"),
        sample("7", 7, prompt="flaky"),
        sample("7", 7, prompt="down"),
        sample("7", 7, prompt="bad"),
    ]
    stats = score_sync(samples, RewardConfig(name="remote", url=f"{url}/score", remote_retries=2))
    assert stats == RewardStats(scored=3, failed=2, timed_out=0, skipped=0)
    assert [s.reward for s in samples] == [1.5, 0.0, 1.0, 0.0, 0.0]
    assert (calls["flaky"], calls["down"], calls["bad"]) == (2, 3, 1)  # 500 retried, 503 retried twice, 422 not
    assert "503" in samples[3].metadata["error"] and "422" in samples[4].metadata["error"]


def test_remote_reward_connection_refused():
    samples = [sample("1", 1)]
    cfg = RewardConfig(name="remote", url=f"http://127.0.0.1:{free_port()}/score", remote_retries=1)
    assert score_sync(samples, cfg).failed == 1
    assert samples[0].metadata["error"].startswith("reward: ConnectError")


def test_rewards_are_bound_by_parameter_name(tmp_path):
    path = write_module(
        tmp_path,
        "by_name",
        """
        def two(response, label):
            return float(response == label)

        async def reordered(label, sample, response, prompt):
            return float(response == label) + len(sample.prompt_ids) + len(prompt)

        def legacy(p, r, l, m):
            return float(r == l)

        def group(labels, responses):
            return [float(r == l) for r, l in zip(responses, labels)]

        def scaled(response, scale):
            return scale * len(response)
        """,
    )
    for fn, expected in (("two", [1.0, 0.0]), ("reordered", [3.0, 2.0]), ("legacy", [1.0, 0.0])):
        samples = [sample("7", "7", prompt="q"), sample("8", "7", prompt="q")]
        assert score_sync(samples, RewardConfig(name=f"{path}:{fn}")).scored == 2, fn
        assert [s.reward for s in samples] == expected, fn
    samples = [sample("7", "7", group_id=0), sample("8", "7", group_id=0)]
    score_sync(samples, RewardConfig(name=f"{path}:group", group=True))
    assert [s.reward for s in samples] == [1.0, 0.0]
    samples = [sample("abc")]
    score_sync(samples, RewardConfig(name=f"{path}:scaled", reward_kwargs={"scale": 2}))
    assert samples[0].reward == 6.0


def test_a_reward_with_unknown_parameters_is_refused_naming_its_place(tmp_path):
    path = write_module(tmp_path, "unknown_param", "\n\ndef fn(answer, label):\n    return 1.0\n")
    with pytest.raises(ValueError, match=rf"unknown_param.py:fn' \({path}:3\): parameter 'answer' is none of"):
        RewardScorer(RewardConfig(name=f"{path}:fn"))


def test_a_reward_failing_on_every_sample_is_an_error_with_its_exception(tmp_path):
    path = write_module(tmp_path, "always", "def fn(response):\n    raise RuntimeError('broken ' + response)\n")
    samples = [sample("a"), sample("b")]
    stats = score_sync(samples, RewardConfig(name=f"{path}:fn"))
    assert (stats.scored, stats.failed) == (0, 2)
    with pytest.raises(
        RewardError, match=rf"failed on all 2 samples.*sample 0: RuntimeError: broken a \(at {path}:2\)"
    ):
        stats.raise_if_none_scored("x")
    score_sync([sample("a", "b"), sample("ok", "ok")], RewardConfig(name="exact")).raise_if_none_scored("exact")


def test_a_reward_that_never_returns_does_not_keep_the_process_alive(tmp_path):
    import subprocess
    import sys

    path = write_module(tmp_path, "never", "import time\n\ndef fn(response):\n    time.sleep(3600)\n")
    script = (
        "from leagues.rollout.rewards import RewardConfig, score_sync\n"
        "from leagues.types import Sample\n"
        "s = [Sample(prompt_ids=[1], metadata={'prompt_text': 'a', 'response_text': 'b'})]\n"
        f"print(score_sync(s, RewardConfig(name={str(path) + ':fn'!r}, timeout_s=0.3)).timed_out)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr
