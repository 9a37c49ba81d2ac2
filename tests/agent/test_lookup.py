"""The built-in `lookup` task: an episode that calls the tool and answers the value scores 1, the no-tool
control cannot look anything up, and the warm start's demonstration pairs are token for token the contexts
the multi-turn generate function builds (so what SFT teaches is what rollout asks)."""

import asyncio
import json

import pytest

from leagues.agent.lookup import LookupEnv
from leagues.agent.multi_turn import AgentConfig, env_generate
from leagues.loop.warm_start import conversation_pairs
from leagues.model import load_tokenizer, resolve_model_path
from leagues.rollout.generate import GenerateContext, RolloutConfig
from leagues.rollout.tasks import make_task
from leagues.types import FinishReason, Sample, SamplingParams
from tests.agent.test_multi_turn import Scripted, ids_of


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path("tiny-moe"))


def episode(tokenizer, row, replies):
    client = Scripted(tokenizer, [(ids_of(tokenizer, r), FinishReason.STOP) for r in replies], [])
    ctx = GenerateContext(client, SamplingParams(max_new_tokens=96), tokenizer, RolloutConfig())
    sample = Sample(prompt_ids=[1], metadata={"prompt_text": row["prompt"], "label": row["label"], "seed": 0})
    return asyncio.run(env_generate(LookupEnv, AgentConfig(max_turns=3))(ctx, sample)), client


def call(key):
    return "<tool_call>" + json.dumps({"name": "lookup", "arguments": {"key": key}}) + "</tool_call>"


def test_calling_the_tool_and_answering_the_value_scores_one(tokenizer):
    (row,) = make_task("lookup").make_rows(1, seed=0, split="train")
    table, key = row["label"]["table"], row["label"]["key"]
    sample, _ = episode(tokenizer, row, [call(key), table[key]])
    assert sample.metadata["env_reward"] == 1.0 and sample.metadata["termination"] == "done"
    assert [m["content"] for m in sample.metadata["messages"] if m["role"] == "tool"] == [table[key]]
    other = next(k for k in table if table[k] != table[key])
    sample, _ = episode(tokenizer, row, [call(other), table[other]])
    assert sample.metadata["env_reward"] == 0.0
    sample, _ = episode(tokenizer, row, [call("zz"), "1"])
    assert "no key 'zz'" in sample.metadata["messages"][2]["content"]


def test_the_no_tool_control_cannot_look_up(tokenizer):
    (row,) = make_task("lookup", {"tools": False}).make_rows(1, seed=0, split="train")
    key = row["label"]["key"]
    sample, _ = episode(tokenizer, row, [call(key), "0"])
    assert "no tool named 'lookup'" in sample.metadata["messages"][2]["content"]


def test_warm_start_pairs_are_the_contexts_rollout_builds(tokenizer):
    (row,) = make_task("lookup").make_rows(1, seed=5, split="train")
    pairs = conversation_pairs(row["messages"], tokenizer)
    assert [response for _, response in pairs] == [row["messages"][1]["content"], row["messages"][3]["content"]]
    sample, client = episode(tokenizer, row, [response for _, response in pairs])
    assert sample.metadata["env_reward"] == 1.0
    for (context, _), (request, _) in zip(pairs, client.requests, strict=True):
        assert tokenizer.encode(context, add_special_tokens=False) == request
