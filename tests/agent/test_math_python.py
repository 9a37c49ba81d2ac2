"""The math-with-Python example's env: a scripted model that runs Python and answers the boxed result scores 1,
with the sandbox's real output as the observation."""

import asyncio
import json

from examples.math_python.env import MathPython
from leagues.agent.multi_turn import AgentConfig, env_generate
from leagues.model import load_tokenizer, resolve_model_path
from leagues.rollout.generate import GenerateContext, RolloutConfig
from leagues.types import FinishReason, Sample, SamplingParams
from tests.agent.test_multi_turn import Scripted, ids_of


def test_a_python_call_and_a_boxed_answer():
    tokenizer = load_tokenizer(resolve_model_path("tiny-moe"))
    code = json.dumps({"name": "python", "arguments": {"code": "print(sum(range(101)))"}})
    turns = [f"<tool_call>{code}</tool_call>", "so \\boxed{5050}"]
    client = Scripted(tokenizer, [(ids_of(tokenizer, t), FinishReason.STOP) for t in turns], [])
    ctx = GenerateContext(client, SamplingParams(max_new_tokens=256), tokenizer, RolloutConfig())
    sample = Sample(prompt_ids=[1], metadata={"prompt_text": "1+2+...+100?", "label": "5050", "seed": 0})
    sample = asyncio.run(env_generate(MathPython, AgentConfig())(ctx, sample))
    assert sample.metadata["messages"][3] == {"role": "tool", "tool_call_id": "call_0_0", "name": "python",
                                              "content": "5050"}  # fmt: skip
    assert sample.metadata["env_reward"] == 1.0
