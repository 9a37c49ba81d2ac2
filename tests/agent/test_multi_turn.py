"""The built-in multi-turn generate function: a scripted engine whose ids do not survive decode→encode (the
ledger keeps the engine's ids), tool results in call order with malformed calls answered, every termination
with its masks, tools from plain functions; on the real tiny engine: alignment, routes from per-turn deltas
equal to one full forward's, and a deterministic rerun bitwise equal at another concurrency."""

import asyncio
import json
import typing
from dataclasses import dataclass

import pytest
import torch

from leagues.agent.env import StepResult, ToolEnv, tool
from leagues.agent.multi_turn import AgentConfig, env_generate, turn_seed
from leagues.engine import Engine, EngineConfig
from leagues.engine.client import LocalClient
from leagues.engine.output import Output
from leagues.model import ForwardBatch, load_pretrained, load_tokenizer, resolve_model_path
from leagues.rollout.generate import GenerateContext, RolloutConfig
from leagues.types import FinishReason, Sample, SampleStatus, SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path("tiny-moe"))


async def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: the first
        b: the second
    """
    return a + b


async def slow(seconds: float = 5.0) -> str:
    await asyncio.sleep(seconds)
    return "late"


class Calculator(ToolEnv):
    def __init__(self):
        super().__init__([add, slow])

    async def reset(self, sample, seed):
        return [{"role": "user", "content": "2+3?"}]

    async def answer(self, text):
        return 1.0 if text.strip() == "5" else 0.0


@dataclass
class Scripted:
    """An engine client that answers turn after turn with the given texts, as ids of its own choosing."""

    tokenizer: object
    turns: list[tuple[list[int], FinishReason]]
    requests: list

    async def generate(self, prompt_ids, params, request_id=None):
        ids, reason = self.turns[len(self.requests)]
        self.requests.append((list(prompt_ids), params))
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return [Output(request_id="r", index=0, prompt_token_ids=prompt_ids, token_ids=ids,
                       logprobs=[-0.5] * len(ids), finish_reason=reason, text=text, weight_version=3)]  # fmt: skip


def ids_of(tokenizer, text, stop=True):
    return tokenizer.encode(text, add_special_tokens=False) + ([tokenizer.eos_token_id] if stop else [])


def run(tokenizer, client, cfg=None, env=Calculator, max_new_tokens=64, seed=7):
    ctx = GenerateContext(client, SamplingParams(max_new_tokens=max_new_tokens), tokenizer, RolloutConfig())
    sample = Sample(prompt_ids=[1], metadata={"seed": seed})
    return asyncio.run(env_generate(env, cfg or AgentConfig())(ctx, sample))


def call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_the_ledger_keeps_the_engines_ids_and_answers_calls_in_order(tokenizer):
    # the engine writes a special id inside "<tool_call>": decode→encode gives other ids
    first = ids_of(tokenizer, call("add", a=2, b=3) + " " + call("add", a=1) + call("nope") + "<tool_call>{bad}")
    first = first[:3] + [tokenizer.pad_token_id] + first[3:]
    assert ids_of(tokenizer, tokenizer.decode(first, skip_special_tokens=True)) != first
    client = Scripted(tokenizer, [(first, FinishReason.STOP), (ids_of(tokenizer, "5"), FinishReason.STOP)], [])
    sample = run(tokenizer, client)
    assert sample.status == SampleStatus.COMPLETED and sample.metadata["termination"] == "done"
    assert sample.metadata["env_reward"] == 1.0 and sample.metadata["num_turns"] == 2
    assert sample.response_ids[: len(first)] == first  # as sampled, never re-tokenized
    tools = [m for m in sample.metadata["messages"] if m["role"] == "tool"]
    assert [m.get("tool_call_id") for m in tools] == ["call_0_0", "call_0_1", "call_0_2", None]
    assert tools[0]["content"] == "5" and "bad arguments for add" in tools[1]["content"]
    assert (
        "no tool named 'nope'" in tools[2]["content"] and "tool call 3: the block is not closed" in tools[3]["content"]
    )
    # the second request is the whole trajectory so far; the mask is 1 exactly on the two sampled turns
    second = client.requests[1][0]
    assert second == sample.prompt_ids + sample.response_ids[: len(second) - len(sample.prompt_ids)]
    assert sample.loss_mask == [1] * len(first) + [0] * (len(second) - len(sample.prompt_ids) - len(first)) + [1] * 2
    assert len(sample.response_ids) == len(sample.loss_mask) == len(sample.rollout_logprobs)
    # per-turn seeds from the sample's seed
    assert [p.seed for _, p in client.requests] == [turn_seed(7, 0), turn_seed(7, 1)]


def test_terminations_and_their_masks(tokenizer):
    calling = ids_of(tokenizer, call("add", a=1, b=1))
    # length mid tool call: the cut call is kept as sampled and not run
    cut = calling[:20]
    sample = run(tokenizer, Scripted(tokenizer, [(cut, FinishReason.LENGTH)], []), max_new_tokens=20)
    assert sample.metadata["termination"] == "length" and sample.status == SampleStatus.TRUNCATED
    assert sample.response_ids == cut and sample.loss_mask == [1] * 20
    # max turns: every turn calls a tool
    sample = run(tokenizer, Scripted(tokenizer, [(calling, FinishReason.STOP)] * 2, []), AgentConfig(max_turns=2))
    assert sample.metadata["termination"] == "max_turns" and sample.metadata["num_turns"] == 2
    assert sample.loss_mask[: len(calling)] == [1] * len(calling) and sample.loss_mask[-len(calling) :] == [1] * len(
        calling
    )
    # context: the tool result would leave no room under max_tokens; the turn before it is kept
    prompt = len(
        run(tokenizer, Scripted(tokenizer, [(calling, FinishReason.STOP)], []), AgentConfig(max_turns=1)).prompt_ids
    )
    cfg = AgentConfig(max_tokens=prompt + len(calling) + 5)
    sample = run(tokenizer, Scripted(tokenizer, [(calling, FinishReason.STOP)], []), cfg)
    assert sample.metadata["termination"] == "context" and sample.response_ids == calling
    # abort
    sample = run(tokenizer, Scripted(tokenizer, [(calling[:3], FinishReason.ABORT)], []))
    assert sample.metadata["termination"] == "abort" and sample.status == SampleStatus.ABORTED


def test_a_tool_past_its_time_and_a_failing_env(tokenizer):
    turns = [(ids_of(tokenizer, call("slow")), FinishReason.STOP), (ids_of(tokenizer, "x"), FinishReason.STOP)]
    sample = run(tokenizer, Scripted(tokenizer, turns, []), AgentConfig(tool_timeout_s=0.05))
    tool_message = next(m for m in sample.metadata["messages"] if m["role"] == "tool")
    assert "ran past its 0.05 s limit" in tool_message["content"] and sample.metadata["env_reward"] == 0.0

    class Broken(Calculator):
        async def step(self, message):
            raise RuntimeError("sandbox down")

    sample = run(tokenizer, Scripted(tokenizer, turns, []), env=Broken)
    assert sample.metadata["termination"] == "tool_error" and "sandbox down" in sample.metadata["error"]


def test_tool_schemas_come_from_signature_and_docstring():
    async def search(
        query: str, limit: int = 5, kind: typing.Literal["web", "news"] = "web", tags: list[str] | None = None
    ):
        """Search the index.

        Args:
            query: what to look for
            limit (int): results at most
        """

    schema = tool(search).schema["function"]
    assert schema["name"] == "search" and schema["description"] == "Search the index."
    assert schema["parameters"] == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "what to look for"},
            "limit": {"type": "integer", "description": "results at most"},
            "kind": {"enum": ["web", "news"]},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["query"],
    }
    with pytest.raises(TypeError, match="parameter x: type"):
        tool(_bad)


def _bad(x: object) -> None:
    pass


class Chatty(ToolEnv):
    """Three turns on the real engine: every turn gets a tool-shaped user reply, the episode never ends early."""

    def __init__(self):
        super().__init__([add])

    async def reset(self, sample, seed):
        return [{"role": "user", "content": f"go {seed % 10}"}]

    async def step(self, message):
        return StepResult(observations=[{"role": "tool", "content": "ok"}], reward=0.5)


def real_run(engine, tokenizer, seeds, concurrent=True, routes=True):
    # the random model rarely samples its stop token: half the vocabulary ends a turn
    params = SamplingParams(max_new_tokens=16, stop_token_ids=list(range(50, 101)), return_routed_experts=routes)
    ctx = GenerateContext(LocalClient(engine), params, tokenizer, RolloutConfig())
    generate = env_generate(Chatty, AgentConfig(max_turns=3))
    samples = [Sample(prompt_ids=[1], metadata={"seed": s}) for s in seeds]

    async def go():
        if concurrent:
            return await asyncio.gather(*(generate(ctx, s) for s in samples))
        return [await generate(ctx, s) for s in samples]

    return asyncio.run(go())


def test_on_the_engine_routes_from_deltas_equal_a_full_forward(engine, tokenizer):
    (sample,) = real_run(engine, tokenizer, [11])
    assert sample.metadata["num_turns"] == 3 and sample.metadata["turn_rewards"]
    assert len(sample.response_ids) == len(sample.loss_mask) == len(sample.rollout_logprobs)
    model = load_pretrained(resolve_model_path("tiny-moe"), dtype=torch.float32)
    ids = sample.prompt_ids + sample.response_ids
    with torch.no_grad():
        out = model.run(ForwardBatch.packed(torch.tensor(ids[:-1]), [len(ids) - 1], capture_experts=True))
    assert sample.routed_experts.shape[0] == len(ids) - 1
    assert torch.equal(sample.routed_experts, out.routed_experts_TLK.to(sample.routed_experts.dtype))
    start = len(sample.prompt_ids) - 1
    want = out.logits_TV.float().log_softmax(-1)[start:].gather(1, torch.tensor(ids[start + 1 :])[:, None])[:, 0]
    mask = torch.tensor(sample.loss_mask, dtype=torch.bool)
    torch.testing.assert_close(torch.tensor(sample.rollout_logprobs)[mask], want[mask], rtol=0, atol=1e-5)


def test_a_deterministic_rerun_is_bitwise_equal_at_another_concurrency(tiny_path, tokenizer):
    engine = Engine(tiny_path, config=EngineConfig(deterministic=True), num_blocks=256, block_size=16)
    try:
        together = real_run(engine, tokenizer, [1, 2, 3, 4], concurrent=True, routes=False)
        alone = real_run(engine, tokenizer, [3, 1], concurrent=False, routes=False)
    finally:
        engine.close()
    for a, b in ((together[2], alone[0]), (together[0], alone[1])):
        assert a.response_ids == b.response_ids and a.rollout_logprobs == b.rollout_logprobs
        assert a.metadata["messages"] == b.metadata["messages"]
