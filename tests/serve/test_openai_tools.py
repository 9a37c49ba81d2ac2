"""Tool calling and reasoning in `/v1/chat/completions` against a real `leagues serve` on loopback, with the
official `openai` client: `tools` reach the chat template, the model's think block comes back as
`reasoning_content` and its `<tool_call>` block as `tool_calls` (streamed too), a history with `tool_calls` and
`tool_call_id` is accepted, a forced call is prefilled, and what cannot be honoured is refused; an agent session
on the same server records the call token for token; route rows come from a given token on.

The served model follows a script (`tests/serve/scripted.py`): a real checkpoint that thinks and calls a tool.
"""

import asyncio
import json
from dataclasses import replace

import httpx
import openai
import pytest
import torch

from leagues.engine.client import HTTPClient
from leagues.types import SamplingParams
from tests.serve.scripted import ADD, CALL, FORCED, HELLO, HI, REPLY, THOUGHT, USER


@pytest.fixture(scope="module")
def server(scripted):
    return scripted


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused")


def test_a_call_comes_back_as_tool_calls(client):
    out = client.chat.completions.create(model="m", messages=USER, tools=[ADD], temperature=0, max_tokens=100)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == THOUGHT
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "add" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"a": 2, "b": 3}
    # without tools, or with tool_choice none, the same output is text
    for extra in ({}, {"tools": [ADD], "tool_choice": "none"}):
        plain = client.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=100, **extra)
        assert plain.choices[0].message.content == CALL and plain.choices[0].message.tool_calls is None
        assert plain.choices[0].message.reasoning_content == THOUGHT
        assert plain.choices[0].finish_reason == "stop"


def test_streamed_calls_equal_the_unstreamed_ones(client):
    kwargs = dict(model="m", messages=USER, tools=[ADD], temperature=0, max_tokens=100)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert [(c.index, c.type, c.function.name, c.function.arguments) for c in calls] == [
        (0, t.type, t.function.name, t.function.arguments) for t in whole.message.tool_calls
    ]
    assert calls[0].id.startswith("call_")  # ids are per request
    assert "".join(d.content or "" for d in deltas) == "" and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == THOUGHT


def test_a_history_with_calls_and_results_reaches_the_template(client, server):
    sent = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [sent]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    out = client.chat.completions.create(model="m", messages=history, tools=[ADD], temperature=0, max_tokens=4)
    tok = server[1]
    want = [USER[0], {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
            {"role": "tool", "content": "5", "tool_call_id": "call_1"}]  # fmt: skip
    text = tok.apply_chat_template(want, tools=[ADD], tokenize=False, add_generation_prompt=True)
    assert out.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))


def test_a_forced_call_is_prefilled_and_continued(client):
    kwargs = dict(model="m", messages=HI, tools=[ADD], temperature=0, max_tokens=100)
    free = client.chat.completions.create(**kwargs).choices[0]
    assert free.message.content == HELLO and free.message.tool_calls is None  # left alone, it greets
    named = {"type": "function", "function": {"name": "add"}}
    for choice in ("required", named):
        forced = client.chat.completions.create(tool_choice=choice, **kwargs).choices[0]
        (call,) = forced.message.tool_calls
        assert forced.finish_reason == "tool_calls" and forced.message.content is None
        assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 1, "b": 1}
        out = client.chat.completions.create(tool_choice=choice, **kwargs)
        assert out.usage.completion_tokens == len(FORCED) + 1 - (0 if choice == "required" else 28)


def test_what_cannot_be_honoured_is_refused_naming_the_field(client):
    for choice in ({"type": "function", "function": {"name": "mul"}}, "required"):
        tools = [ADD] if choice != "required" else None
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            client.chat.completions.create(model="m", messages=USER, tools=tools, tool_choice=choice)
    call = {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{oops"}}
    bad = USER + [{"role": "assistant", "tool_calls": [call]}]
    with pytest.raises(openai.BadRequestError, match="tool call c: arguments are not JSON"):
        client.chat.completions.create(model="m", messages=bad, tools=[ADD])


def test_a_session_on_leagues_serve_records_the_calls_token_exact(server):
    url, tok = server
    sid = httpx.post(url + "/sessions", json={"seed": 3}).json()["id"]
    agent = openai.OpenAI(base_url=f"{url}/sessions/{sid}/v1", api_key="unused")
    first = agent.chat.completions.create(model="m", messages=USER, tools=[ADD], temperature=0, max_tokens=100)
    (call,) = first.choices[0].message.tool_calls
    assert call.id == "call_0_0" and json.loads(call.function.arguments) == {"a": 2, "b": 3}
    assert first.choices[0].message.reasoning_content == THOUGHT
    history = [*USER, first.choices[0].message.model_dump(exclude_none=True)]
    history.append({"role": "tool", "tool_call_id": call.id, "content": "5"})
    agent.chat.completions.create(model="m", messages=history, tools=[ADD], temperature=0, max_tokens=3)
    sample = httpx.post(f"{url}/sessions/{sid}/close", json={"reward": 1.0}).json()["sample"]
    called = tok.encode(REPLY, add_special_tokens=False) + [tok.eos_token_id]
    assert sample["response_ids"][: len(called)] == called and sample["loss_mask"][: len(called)] == [1] * len(called)
    assert sample["loss_mask"][-3:] == [1, 1, 1] and sample["metadata"]["env_reward"] == 1.0
    assert sample["metadata"]["termination"] == "length"  # the second turn hit its 3 tokens
    with pytest.raises(openai.NotFoundError):  # closed
        agent.chat.completions.create(model="m", messages=USER)


def test_route_rows_from_a_given_token_over_http(server):
    """`routed_experts_start`: a multi-turn client fetches only the rows of a turn's new tokens."""

    async def both():
        client = HTTPClient([server[0]])
        params = SamplingParams(temperature=0, max_new_tokens=6, return_routed_experts=True)
        (whole,) = await client.generate(list(range(5, 25)), params)
        (delta,) = await client.generate(list(range(5, 25)), replace(params, routed_experts_start=17))
        await client.aclose()
        return whole, delta

    whole, delta = asyncio.run(both())
    assert whole.routed_experts.shape[0] == 20 + 6 - 1 and delta.token_ids == whole.token_ids
    assert torch.equal(delta.routed_experts, whole.routed_experts[17:])
