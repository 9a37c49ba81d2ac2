"""The built-in multi-turn generate function: an engine, a trajectory ledger and an `Env`, turn by turn.

    generate = env_generate("my_envs:Calculator", AgentConfig(max_turns=4))    # --env my_envs:Calculator
    sample = await generate(ctx, sample)                                       # rollout's generate protocol

    reset ─► render prompt (+ tool schemas) ─► ledger ─┬─► engine request (input == ledger, exactly)
                                                       │     └─► append sampled ids, logprobs, route rows
                                                       │   parse tool calls ─► env.step(assistant message)
                                                       └── bridge(observations) appended as context ◄─┘

Where it sits: `leagues train --env module:Factory` (or a task that names an env, `--task lookup`) makes this
the rollout's generate function; every sample of a step runs its episode concurrently, so the engine batches
their turns.

Decisions:
- Token-exact: the sampled ids go into the ledger as the engine returned them (never decoded and encoded
  again); text is only read (tool-call parsing, the env's messages). Observations become ids through the
  chat render's bridge, and every request is checked to equal the ledger before it is sent.
- A turn that stops on a stop string instead of the model's stop token gets the stop token appended as
  context (mask 0), so the chat template's turn structure stays intact.
- Determinism: turn t of a sample samples with a seed derived from the sample's seed and t, and tool-call
  ids are `call_<turn>_<index>`, so a rerun repeats the trajectory whatever else shares the engine's batch.
- Routes: each request asks for the routed experts from the first token without a row
  (`routed_experts_start`; an engine that returns whole records works too) and the ledger keeps them
  (`Ledger.add_routes`), so the sample's routes cover every token of every turn and a turn moves only its
  new rows.
- Ends (`Termination`): the env says done (done); a turn hits its token limit, mid tool call or not (length);
  the observations would leave no room under `max_tokens` (context); `max_turns` turns (max_turns); the env
  raises (tool_error, the error in `metadata["error"]`); the engine aborts (abort).
- Rewards: the last reward the env gave is `metadata["env_reward"]` (the `env` reward reads it); earlier
  ones are kept as `metadata["turn_rewards"]`, `[token index in the response, value]` pairs. The whole
  conversation is `metadata["messages"]`, the env's info `metadata["env_info"]`, for reward functions.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar

from leagues.agent.env import Env, StepResult, ToolEnv, ToolLimits, assistant_message
from leagues.agent.ledger import Ledger, Termination
from leagues.agent.render import ChatRender
from leagues.agent.tool_calls import TOOL_CALL_PARSERS, parse_tool_calls
from leagues.config import load_named
from leagues.rollout.generate import GenerateContext, GenerateFn
from leagues.types import FinishReason, Sample


@dataclass(kw_only=True, slots=True)
class AgentConfig:
    SHORTHAND: ClassVar[str] = "run"
    """`--agent module:run` sets `agent.run`."""

    run: str = ""
    """'module:function' of the user's agent, `async def run(base_url, prompt, sampling, metadata) -> reward |
    None`, which talks OpenAI's chat API to a session per sample (`leagues.agent.agents`); empty: none."""
    max_turns: int = 8
    """Model turns per episode at most (termination max_turns; env episodes)."""
    max_tokens: int = 2048
    """Tokens of a whole trajectory at most, prompt and observations included; a turn samples at most what is
    left (and at most `rollout.max_response_len`) (env episodes)."""
    tool_timeout_s: float = 30.0
    """Wall-clock time of one tool call (ToolEnv); past it the model reads a timeout error."""
    max_parallel_tools: int = 8
    """Tool calls of one turn running at once (ToolEnv)."""
    parser: str = "hermes"
    """Tool-call parser of the model family (a key of `leagues.agent.TOOL_CALL_PARSERS`)."""

    def __post_init__(self) -> None:
        checks = {
            "max_turns": self.max_turns >= 1,
            "max_tokens": self.max_tokens >= 2,
            "tool_timeout_s": self.tool_timeout_s > 0,
            "max_parallel_tools": self.max_parallel_tools >= 1,
            "parser": self.parser in TOOL_CALL_PARSERS,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"AgentConfig.{key}: invalid value {getattr(self, key)!r}")


def load_env_factory(spec: str) -> Callable[[], Env]:
    """The env class or factory named by 'module:Name' (called with no arguments, once per episode)."""
    factory = load_named(spec, "env", "module:Factory")
    if not callable(factory):
        raise ValueError(f"env {spec!r}: not a class or function")
    return factory


def turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of turn `turn` of a sample seeded `seed`."""
    return (seed * 1_000_033 + turn * 7_919 + 1) % 2**31


def env_generate(factory: Callable[[], Env] | str, cfg: AgentConfig) -> GenerateFn:
    """A generate function (rollout's protocol) that runs one episode of `factory()`'s env per sample."""
    if isinstance(factory, str):
        factory = load_env_factory(factory)
    renders: dict[int, ChatRender] = {}

    async def generate(ctx: GenerateContext, sample: Sample) -> Sample:
        render = renders.get(id(ctx.tokenizer))
        if render is None:  # the append-only check runs once per tokenizer
            render = renders[id(ctx.tokenizer)] = ChatRender(ctx.tokenizer)
        env = factory()
        if isinstance(env, ToolEnv):
            env.limits = ToolLimits(timeout_s=cfg.tool_timeout_s, max_parallel=cfg.max_parallel_tools)
        try:
            return await run_episode(ctx, sample, env, render, cfg)
        finally:
            await _maybe_await(env.close())

    return generate


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


@dataclass(slots=True)
class _Episode:
    ledger: Ledger
    messages: list[dict]
    turn_rewards: list[list] = field(default_factory=list)
    reward: float | None = None
    reward_at: int = 0
    """Index in the response of the last token of the turn the reward was given for."""
    info: dict = field(default_factory=dict)
    error: str = ""


async def run_episode(ctx: GenerateContext, sample: Sample, env: Env, render: ChatRender, cfg: AgentConfig) -> Sample:
    """Run `env` to its end against `ctx.client` and fill `sample` with the trajectory."""
    seed = int(sample.metadata.get("seed") or 0)
    messages = list(await _maybe_await(env.reset(sample, seed)))
    tools = list(getattr(env, "tools", None) or []) or None
    episode = _Episode(Ledger(render.prompt(messages, tools)), messages)
    termination = None
    for turn in range(cfg.max_turns):
        termination = await _turn(ctx, env, render, cfg, episode, seed, turn)
        if termination is not None:
            break
    return _fill(sample, episode, termination)


async def _turn(ctx, env, render, cfg, episode: _Episode, seed: int, turn: int) -> Termination | None:
    """One model turn and the env's answer; the termination, or None to go on."""
    ledger = episode.ledger
    request = list(ledger.token_ids)
    ledger.check_request(request)
    budget = min(ctx.params.max_new_tokens, cfg.max_tokens - ledger.num_tokens)
    params = replace(ctx.params, n=1, seed=turn_seed(seed, turn), max_new_tokens=budget, ignore_eos=False,
                     routed_experts_start=ledger.routes_start)  # fmt: skip
    out = (await ctx.client.generate(request, params))[0]
    ledger.append_sampled(out.token_ids, out.logprobs, out.weight_version)
    if out.finish_reason == FinishReason.ABORT:
        return Termination.ABORT
    if out.routed_experts is not None:
        ledger.add_routes(out.routed_experts)
    if out.finish_reason == FinishReason.LENGTH:
        episode.messages.append({"role": "assistant", "content": out.text})
        return Termination.LENGTH
    calls, errors = parse_tool_calls(out.text, cfg.parser)
    message = assistant_message(out.text, calls, errors, turn)
    episode.messages.append(message)
    try:
        result = await _maybe_await(env.step(message))
    except Exception as e:  # the env failed, not the model: the episode ends here, its tokens kept
        episode.error = f"env.step: {type(e).__name__}: {e}"
        return Termination.TOOL_ERROR
    if not isinstance(result, StepResult):
        raise TypeError(f"env.step must return a StepResult, got {type(result).__name__}")
    _record_reward(episode, result)
    if result.done:
        return Termination.DONE
    if turn == cfg.max_turns - 1:  # no request follows: the observations stay out of the trajectory
        episode.messages += result.observations
        return Termination.MAX_TURNS
    closing = [] if out.token_ids[-1:] == render.stop_ids[-1:] else render.stop_ids
    bridge = closing + render.bridge(result.observations)
    if ledger.num_tokens + len(bridge) >= cfg.max_tokens:
        return Termination.CONTEXT
    ledger.append_context(bridge)
    episode.messages += result.observations
    return None


def _record_reward(episode: _Episode, result: StepResult) -> None:
    episode.info |= result.info
    if result.reward is None:
        return
    if episode.reward is not None:  # an earlier reward becomes a per-turn one
        episode.turn_rewards.append([episode.reward_at, episode.reward])
    episode.reward = float(result.reward)
    episode.reward_at = episode.ledger.num_tokens - len(episode.ledger.prompt_ids) - 1


def _fill(sample: Sample, episode: _Episode, termination: Termination) -> Sample:
    done = episode.ledger.to_sample(termination)
    sample.prompt_ids, sample.response_ids = done.prompt_ids, done.response_ids
    sample.loss_mask, sample.rollout_logprobs = done.loss_mask, done.rollout_logprobs
    sample.routed_experts, sample.status, sample.weight_version = done.routed_experts, done.status, done.weight_version
    final = next((m for m in reversed(episode.messages) if m["role"] == "assistant"), {})
    sample.metadata |= done.metadata | {
        "messages": episode.messages,
        "response_text": final.get("content") or "",
        "env_reward": episode.reward,
        "turn_rewards": episode.turn_rewards,
        "env_info": episode.info,
    }
    if episode.error:
        sample.metadata["error"] = episode.error
    return sample
