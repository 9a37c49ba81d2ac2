"""`leagues train --agent module:run`: the user's own agent code, talking OpenAI to a session, as the rollout.

    async def run(base_url: str, prompt: str, sampling: dict, metadata: dict) -> float | None:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="none")
        reply = await client.chat.completions.create(model="policy", messages=[...], tools=[...])
        ...
        return reward                      # or None: the run's reward function scores the sample

Where it sits: a generate function (rollout's protocol) like the `Env` loop's. Per sample it opens a session
seeded with the sample's seed, calls `run` with the session's URL, closes the session and fills the sample with
the trajectory exactly as sampled. The sessions themselves are the HTTP front's (`leagues.serve.sessions`,
`LoopbackSessions`): the loop hands them in, so this package stays below the HTTP stack.

Decisions:
- The session server runs on the rollout's own event loop (started with the first sample), so sessions reach
  the engine through the run's client on the loop that client belongs to. `run` must therefore be `async` and
  use async clients (`openai.AsyncOpenAI`, httpx.AsyncClient): a blocking call would stop the loop that answers it.
- Sampling follows the run (`rollout.temperature`, `top_p`, `max_response_len` per turn); `sampling` tells
  the agent what they are. A returned reward is `metadata["env_reward"]` (the `env` reward reads it).
"""

import asyncio
from typing import Protocol

from leagues.config import load_named
from leagues.engine.client import EngineClient
from leagues.rollout.generate import GenerateContext, GenerateFn
from leagues.types import Sample, SamplingParams


class SessionServer(Protocol):
    """Sessions served over HTTP to the user's agent, one per sample."""

    async def open(self, client: EngineClient, tokenizer, params: SamplingParams, seed: int) -> tuple[str, str]:
        """A new session (its server started on the running loop if need be): (session id, its OpenAI base URL)."""
        ...

    def close(self, session_id: str, reward: float | None) -> Sample:
        """The session's trajectory as a `Sample` (reward in `metadata["env_reward"]`); the session ends."""
        ...

    def discard(self, session_id: str) -> None:
        """End a session whose agent failed, keeping nothing."""
        ...

    async def aclose(self) -> None:
        """Stop the server."""
        ...


def load_agent(spec: str):
    fn = load_named(spec, "agent", "module:function")
    if not asyncio.iscoroutinefunction(fn):
        raise ValueError(f"agent {spec!r}: must be an `async def run(base_url, prompt, sampling, metadata)`")
    return fn


def agent_generate(spec: str, sessions: SessionServer) -> GenerateFn:
    """A generate function that runs the user's agent `spec` ('module:run') against a session per sample."""
    run = load_agent(spec)

    async def generate(ctx: GenerateContext, sample: Sample) -> Sample:
        seed = int(sample.metadata.get("seed") or 0)
        session_id, url = await sessions.open(ctx.client, ctx.tokenizer, ctx.params, seed)
        sampling = {"temperature": ctx.params.temperature, "top_p": ctx.params.top_p,
                    "max_tokens": ctx.params.max_new_tokens}  # fmt: skip
        try:
            reward = await run(url, sample.metadata.get("prompt_text", ""), sampling, dict(sample.metadata))
        except BaseException:
            sessions.discard(session_id)
            raise
        done = sessions.close(session_id, None if reward is None else float(reward))
        sample.prompt_ids, sample.response_ids = done.prompt_ids, done.response_ids
        sample.loss_mask, sample.rollout_logprobs = done.loss_mask, done.rollout_logprobs
        sample.routed_experts, sample.status = done.routed_experts, done.status
        sample.weight_version = done.weight_version
        sample.metadata |= done.metadata
        return sample

    generate.aclose = sessions.aclose  # the run stops the session server when it closes
    return generate
