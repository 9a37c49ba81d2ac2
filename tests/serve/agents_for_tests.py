"""Agents a test runs through sessions (`--agent tests.serve.agents_for_tests:three_turns`), with the official
`openai` client."""

import openai

PARAMETERS = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add.", "parameters": PARAMETERS}}]


async def three_turns(base_url: str, prompt: str, sampling: dict, metadata: dict) -> float:
    """The conversation `Chatty` (tests/agent/test_multi_turn.py) has with the model, as an OpenAI agent."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none")
    messages = [{"role": "user", "content": f"go {metadata['seed'] % 10}"}]
    for turn in range(3):
        reply = await client.chat.completions.create(model="policy", messages=messages, tools=TOOLS, temperature=0.3)
        messages.append(reply.choices[0].message.model_dump(exclude_none=True))
        if reply.choices[0].finish_reason == "length":  # the session samples no more
            break
        if turn < 2:
            messages.append({"role": "tool", "tool_call_id": "none", "content": "ok"})
    await client.close()
    return 0.5


async def rewrites_history(base_url: str, prompt: str, sampling: dict, metadata: dict) -> float:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none")
    messages = [{"role": "user", "content": "go"}]
    reply = await client.chat.completions.create(model="policy", messages=messages)
    messages += [
        {"role": "assistant", "content": reply.choices[0].message.content + "!"},
        {"role": "user", "content": "and?"},
    ]
    try:
        await client.chat.completions.create(model="policy", messages=messages)
    except openai.BadRequestError as e:
        metadata_error = str(e)
    await client.close()
    raise RuntimeError(metadata_error)
