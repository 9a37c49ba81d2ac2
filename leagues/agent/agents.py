"""`leagues train --agent module:run`: the user's own agent code, talking OpenAI to a session, as the rollout.

    async def run(base_url: str, prompt: str, sampling: dict, metadata: dict) -> float | None:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="none")
        reply = await client.chat.completions.create(model="policy", messages=[...], tools=[...])
        ...
        return reward                      # or None: the run's reward function scores the sample

Where it sits: a generate function (rollout's protocol) like the `Env` loop's. Per sample it opens a session
(`leagues.agent.sessions`) seeded with the sample's seed, calls `run` with the session's URL, closes the
session and fills the sample with the trajectory exactly as sampled.

Decisions:
- The session routes are served on loopback by a uvicorn server that runs as a task on the rollout's own
  event loop (started with the first sample), so sessions reach the engine through the run's client on the
  loop that client belongs to. `run` must therefore be `async` and use async clients (`openai.AsyncOpenAI`,
  httpx.AsyncClient): a blocking call would stop the loop that answers it.
- Sampling follows the run (`rollout.temperature`, `top_p`, `max_response_len` per turn); `sampling` tells
  the agent what they are. A returned reward is `metadata["env_reward"]` (the `env` reward reads it).
"""

import asyncio
import socket

from leagues.agent.sessions import SessionStore, session_router
from leagues.config import load_named
from leagues.rollout.generate import GenerateContext, GenerateFn
from leagues.types import Sample


def load_agent(spec: str):
    fn = load_named(spec, "agent", "module:function")
    if not asyncio.iscoroutinefunction(fn):
        raise ValueError(f"agent {spec!r}: must be an `async def run(base_url, prompt, sampling, metadata)`")
    return fn


class _Loopback:
    """The session server of one run, on 127.0.0.1 and a free port, started on the running loop."""

    def __init__(self) -> None:
        self.url, self.store, self._server = "", None, None

    async def start(self, ctx: GenerateContext) -> SessionStore:
        if self.store is not None:
            return self.store
        import uvicorn
        from fastapi import FastAPI

        self.store = SessionStore(ctx.client, ctx.tokenizer, ctx.params, client_sampling=False)
        app = FastAPI()
        app.include_router(session_router(self.store))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
            if self._task.done():
                self._task.result()  # raises what stopped it
            await asyncio.sleep(0.01)
        return self.store

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await self._task
            self._server, self.store = None, None


def agent_generate(spec: str) -> GenerateFn:
    """A generate function that runs the user's agent `spec` ('module:run') against a session per sample."""
    run = load_agent(spec)
    server = _Loopback()

    async def generate(ctx: GenerateContext, sample: Sample) -> Sample:
        store = await server.start(ctx)
        session = store.create(int(sample.metadata.get("seed") or 0), ctx.params)
        sampling = {"temperature": ctx.params.temperature, "top_p": ctx.params.top_p,
                    "max_tokens": ctx.params.max_new_tokens}  # fmt: skip
        try:
            reward = await run(f"{server.url}/sessions/{session.id}/v1", sample.metadata.get("prompt_text", ""),
                               sampling, dict(sample.metadata))  # fmt: skip
        except BaseException:
            store.sessions.pop(session.id, None)
            raise
        done = store.close(session.id, None if reward is None else float(reward))
        sample.prompt_ids, sample.response_ids = done.prompt_ids, done.response_ids
        sample.loss_mask, sample.rollout_logprobs = done.loss_mask, done.rollout_logprobs
        sample.routed_experts, sample.status, sample.weight_version = (
            done.routed_experts,
            done.status,
            done.weight_version,
        )
        sample.metadata |= done.metadata
        return sample

    generate.aclose = server.aclose  # the run stops the session server when it closes
    return generate
