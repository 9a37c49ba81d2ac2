"""Agent sessions: an `openai`-client agent through a session and the same conversation through an `Env` give
the same sample for the same seed (ids, mask, logprobs, routes); a rewritten history is refused naming the
message; `leagues train --agent module:run` trains on what the sessions recorded."""

import asyncio
import json

import pytest
import torch

from leagues.agent.agents import agent_generate
from leagues.cli.main import main
from leagues.engine import Engine, EngineConfig
from leagues.engine.client import LocalClient
from leagues.model import load_tokenizer, resolve_model_path
from leagues.rollout.generate import GenerateContext, RolloutConfig
from leagues.serve.sessions import LoopbackSessions
from leagues.types import Sample, SampleStatus, SamplingParams
from tests.agent.test_multi_turn import real_run


@pytest.fixture(scope="module")
def deterministic(tiny_path):
    """Batch-invariant kernels: the same tokens get the same logprobs whatever else shares the batch."""
    engine = Engine(tiny_path, config=EngineConfig(deterministic=True), num_blocks=256, block_size=16)
    yield engine
    engine.close()


def agent_run(engine, tokenizer, spec, seeds):
    params = SamplingParams(max_new_tokens=16, stop_token_ids=list(range(50, 101)), return_routed_experts=True)
    ctx = GenerateContext(LocalClient(engine), params, tokenizer, RolloutConfig())
    generate = agent_generate(spec, LoopbackSessions())
    samples = [Sample(prompt_ids=[1], metadata={"seed": s}) for s in seeds]

    async def go():
        return await asyncio.gather(*(generate(ctx, s) for s in samples), return_exceptions=True)

    return asyncio.run(go())


def test_an_openai_agent_through_a_session_equals_the_env_loop(deterministic):
    tokenizer = load_tokenizer(resolve_model_path("tiny-moe"))
    seeds = [11, 12]
    through_env = real_run(deterministic, tokenizer, seeds)
    through_sessions = agent_run(deterministic, tokenizer, "tests.serve.agents_for_tests:three_turns", seeds)
    for a, b in zip(through_env, through_sessions, strict=True):
        assert isinstance(b, Sample), b
        assert a.prompt_ids == b.prompt_ids and a.response_ids == b.response_ids
        assert a.loss_mask == b.loss_mask and a.rollout_logprobs == b.rollout_logprobs
        assert torch.equal(a.routed_experts, b.routed_experts)
        assert b.metadata["env_reward"] == 0.5 and b.metadata["num_turns"] == 3 and b.status == SampleStatus.COMPLETED


def test_a_rewritten_history_is_refused_naming_the_message(engine):
    tokenizer = load_tokenizer(resolve_model_path("tiny-moe"))
    (error,) = agent_run(engine, tokenizer, "tests.serve.agents_for_tests:rewrites_history", [1])
    assert "messages[1]: differs from the session's conversation" in str(error)


def test_train_with_a_users_agent_from_the_command_line(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n" for i in range(4)))
    args = ["train", "--data", str(data), "--agent", "tests.serve.agents_for_tests:three_turns", "--steps", "1"]
    args += ["--rollout.batch_size", "2", "--rollout.n_samples_per_prompt", "2", "--rollout.max_response_len", "4"]
    stops = "[" + ",".join("abcdefghijklmnopqrstuvwxyz") + "]"  # the random model's turns end early
    args += [
        "--rollout.stop",
        stops,
        "--obs.tensorboard",
        "false",
        "--report",
        "false",
        "--checkpoint.enabled",
        "false",
    ]
    assert main([*args, "--run_dir", str(tmp_path / "run")]) == 0
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["rollout/failed"] == 0 and row["rollout/reward_mean"] == 0.5
    assert row["rollout/response_len_mean"] > 3 * 4  # three turns and the bridges between them
