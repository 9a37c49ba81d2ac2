"""Streamed chat against a real `leagues serve` (the scripted model, `tests/serve/scripted.py`), with the official
`openai` client: a stream's chunks reassemble to the unstreamed answer for the same seed (content,
`reasoning_content`, `tool_calls`, finish reason), on the plain route and in an agent session, where the streamed
turn records what the unstreamed one does (ids, mask, logprobs); a forced call in a session puts its opening in
the ledger as context (mask 0); a client that leaves mid-stream aborts the turn, which is recorded as aborted."""

import json
import time

import httpx
import openai
import pytest

from tests.serve.scripted import ADD, CALL, FORCED, HI, REPLY, THOUGHT, USER


def reassembled(chunks) -> tuple[dict, str]:
    """The message and finish reason a stream's chunks add up to."""
    message = {"role": None, "content": "", "reasoning_content": "", "tool_calls": []}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            message["role"] = delta.role or message["role"]
            message["content"] += delta.content or ""
            message["reasoning_content"] += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or []:
                assert call.index == len(message["tool_calls"])  # each call arrives whole, in order
                message["tool_calls"].append({"id": call.id, "type": call.type, "function": call.function.model_dump()})
            finish = choice.finish_reason or finish
    return message, finish


def whole(choice) -> dict:
    m = choice.message.model_dump()
    calls = [{"id": c["id"], "type": c["type"], "function": c["function"]} for c in m.get("tool_calls") or []]
    return {"role": m["role"], "content": m["content"] or "", "reasoning_content": m.get("reasoning_content") or "",
            "tool_calls": calls}  # fmt: skip


def session(url: str, seed: int) -> tuple[str, openai.OpenAI]:
    sid = httpx.post(url + "/sessions", json={"seed": seed}).json()["id"]
    return sid, openai.OpenAI(base_url=f"{url}/sessions/{sid}/v1", api_key="unused")


def close(url: str, sid: str) -> dict:
    return httpx.post(f"{url}/sessions/{sid}/close", json={"reward": 1.0}).json()["sample"]


@pytest.mark.parametrize("messages", [USER, HI], ids=["thinks-and-calls", "greets"])
def test_plain_route_chunks_reassemble_the_answer(scripted, messages):
    client = openai.OpenAI(base_url=scripted[0] + "/v1", api_key="unused")
    wants = []
    for temperature in (0.0, 1.0):
        kwargs = dict(model="m", messages=messages, tools=[ADD], temperature=temperature, seed=5, max_tokens=120)
        answer = client.chat.completions.create(**kwargs).choices[0]
        streamed, finish = reassembled(client.chat.completions.create(stream=True, **kwargs))
        want = whole(answer)
        for got in (streamed, want):  # ids are per request
            for call in got["tool_calls"]:
                call.pop("id")
        assert streamed == want and finish == answer.finish_reason
        wants.append(want)
    if messages == USER:
        want = wants[0]  # greedy: the script
        assert want["reasoning_content"] == THOUGHT and want["tool_calls"][0]["function"]["name"] == "add"


def test_a_streamed_session_turn_records_what_an_unstreamed_one_does(scripted):
    url = scripted[0]
    answers, samples = [], []
    for stream in (False, True):
        sid, agent = session(url, seed=9)
        history, got = list(USER), []
        for _ in range(2):
            kwargs = dict(model="m", messages=history, tools=[ADD], temperature=1.0, max_tokens=120)
            if stream:
                message, finish = reassembled(agent.chat.completions.create(stream=True, **kwargs))
            else:
                choice = agent.chat.completions.create(**kwargs).choices[0]
                message, finish = whole(choice), choice.finish_reason
            got.append((message, finish))
            if finish != "tool_calls":
                break
            sent = {"role": "assistant", "content": message["content"] or None, "tool_calls": message["tool_calls"]}
            history += [sent, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "5"}]
        answers.append(got)
        samples.append(close(url, sid))
    assert answers[0] == answers[1] and answers[0][0][0]["reasoning_content"] == THOUGHT
    for key in ("prompt_ids", "response_ids", "loss_mask", "status"):
        assert samples[0][key] == samples[1][key], key
    # the second session's prefill reads the first one's cached blocks: the same tokens, logprobs to float noise
    assert samples[0]["rollout_logprobs"] == pytest.approx(samples[1]["rollout_logprobs"], abs=1e-5)
    assert samples[0]["metadata"]["num_turns"] == len(answers[0]) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_in_a_session_is_context_in_the_ledger(scripted, stream):
    url, tok = scripted
    sid, agent = session(url, seed=1)
    choice = {"type": "function", "function": {"name": "add"}}
    kwargs = dict(model="m", messages=HI, tools=[ADD], tool_choice=choice, temperature=0, max_tokens=80)
    if stream:
        message, finish = reassembled(agent.chat.completions.create(stream=True, **kwargs))
    else:
        out = agent.chat.completions.create(**kwargs).choices[0]
        message, finish = whole(out), out.finish_reason
    (call,) = message["tool_calls"]
    assert finish == "tool_calls" and call["id"] == "call_0_0"
    assert call["function"]["name"] == "add" and json.loads(call["function"]["arguments"]) == {"a": 1, "b": 1}
    sample = close(url, sid)
    injected = tok.encode('<tool_call>\n{"name": "add", "arguments":', add_special_tokens=False)
    sampled = tok.encode(FORCED[28:], add_special_tokens=False) + [tok.eos_token_id]
    assert sample["response_ids"] == injected + sampled
    assert sample["loss_mask"] == [0] * len(injected) + [1] * len(sampled)
    assert all(lp == 0.0 for lp in sample["rollout_logprobs"][: len(injected)])
    assert sample["metadata"]["token_versions"][: len(injected)] == [-1] * len(injected)


def test_a_client_that_leaves_mid_stream_aborts_the_turn(scripted):
    url, tok = scripted
    sid = httpx.post(url + "/sessions", json={"seed": 2}).json()["id"]
    body = {"messages": USER, "tools": [ADD], "temperature": 0, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{url}/sessions/{sid}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = (line for line in response.iter_lines() if line)
        first = next(lines)
        assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
        assert "delta" in next(lines)  # the model has sampled a token (the role chunk goes out before any)
    deadline = time.monotonic() + 30
    while (closed := httpx.post(f"{url}/sessions/{sid}/close", json={})).status_code == 400:
        assert "a turn is sampling" in closed.text and time.monotonic() < deadline
        time.sleep(0.05)
    sample = closed.json()["sample"]
    full = len(tok.encode(REPLY, add_special_tokens=False)) + 1
    assert sample["metadata"]["termination"] == "abort" and sample["status"] == "aborted"
    assert 0 < len(sample["response_ids"]) < full and set(sample["loss_mask"]) == {1}
    assert CALL  # the reply the model was writing
