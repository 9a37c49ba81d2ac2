"""Environments and tools for multi-turn rollout: the `Env` protocol, plain Python functions as tools, and
`ToolEnv`, an environment that runs the model's tool calls.

    class Calculator(ToolEnv):
        def __init__(self):
            super().__init__([add])                    # async def add(a: int, b: int) -> int (a tool)
        async def reset(self, sample, seed):
            return [{"role": "user", "content": sample.metadata["prompt_text"]}]
        async def answer(self, text):                # the model answered without calling a tool
            return 1.0 if text.strip() == "5" else 0.0

Where it sits: the multi-turn generate function (`leagues.agent.rollout`) makes one env per sample from a
factory (`--env module:Factory`), renders `reset`'s messages with `env.tools` as the prompt, and hands each
assistant turn to `step`, whose observations it appends to the trajectory as context.

Decisions:
- An assistant message reaches `step` in OpenAI's shape: `content` (the text, tool-call blocks included, as
  sampled) and `tool_calls` (`id`, `function.name`, `function.arguments` as a JSON string), plus
  `tool_call_errors`: the blocks that could not be read, each `{"index", "message"}`. `ToolEnv` answers every
  block, readable or not, with one tool message, in the order the model wrote them.
- A tool is a function (async, or sync run in a thread) whose OpenAI schema comes from its signature (type
  hints give JSON types; parameters without a default are required) and its docstring (the first paragraph
  describes the tool, an `Args:` section its parameters). Arguments are checked against the signature before
  the call; a wrong or missing argument, an exception or a call past `timeout_s` becomes an error message
  for the model, never a failed sample.
- `ToolLimits` (time per call, calls of one turn in flight at once) are set by the generate function from
  `--agent.*`, so a user's env gets them without wiring.
"""

import asyncio
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from leagues.agent.tool_calls import error_observation
from leagues.types import Sample


@dataclass(slots=True)
class StepResult:
    observations: list[dict] = field(default_factory=list)
    """Messages for the model (tool results, user turns), appended in this order."""
    reward: float | None = None
    """A reward for this turn; the last one given is the episode's (`env` reward), earlier ones are kept as
    per-turn rewards."""
    done: bool = False
    info: dict = field(default_factory=dict)
    """Anything the env reports; merged into the sample's `metadata["env_info"]`."""


@runtime_checkable
class Env(Protocol):
    tools: list[dict]
    """OpenAI function schemas (`{"type": "function", "function": {...}}`) rendered into the prompt."""

    async def reset(self, sample: Sample, seed: int) -> list[dict]:
        """The first messages of the episode (`sample.metadata` holds the prompt row: text, label, ...)."""
        ...

    async def step(self, message: dict) -> StepResult:
        """The model's turn (an assistant message) in, what happens next out."""
        ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------------
# tools from functions

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}


@dataclass(slots=True)
class Tool:
    fn: Callable
    name: str
    schema: dict
    """`{"type": "function", "function": {"name", "description", "parameters"}}`."""


def tool(fn: Callable, name: str | None = None) -> Tool:
    """A tool from a plain function: its schema from the signature and docstring."""
    if isinstance(fn, Tool):
        return fn
    if not callable(fn):
        raise TypeError(f"a tool must be a function, got {fn!r}")
    name = name or fn.__name__
    description, arg_docs = _docstring(inspect.getdoc(fn) or "")
    properties, required = {}, []
    hints = typing.get_type_hints(fn)
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {name}: *args / **kwargs cannot be described to the model")
        prop = _json_type(hints.get(param.name, str), f"tool {name}, parameter {param.name}")
        if param.name in arg_docs:
            prop["description"] = arg_docs[param.name]
        properties[param.name] = prop
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
    parameters = {"type": "object", "properties": properties, "required": required}
    return Tool(fn, name, {"type": "function", "function": {"name": name, "description": description,
                                                            "parameters": parameters}})  # fmt: skip


def _json_type(hint, where: str) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _json_type(rest[0], where)
        return {"anyOf": [_json_type(a, where) for a in rest]}
    base = origin or hint
    if base not in _JSON_TYPES:
        raise TypeError(f"{where}: type {hint!r} has no JSON schema (use int, float, str, bool, list, dict)")
    out = {"type": _JSON_TYPES[base]}
    if base is list and args:
        out["items"] = _json_type(args[0], where)
    return out


def _docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The first paragraph, and `name: text` lines of an `Args:` section."""
    head, _, rest = doc.partition("\n\n")
    args, section = {}, False
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:", "Parameters:"):
            section = True
        elif section and (m := re.match(r"\s+(\w+)\s*(?:\([^)]*\))?:\s*(.+)", line)):
            args[m.group(1)] = m.group(2).strip()
        elif section and line and not line[0].isspace():
            section = False
    return " ".join(head.split()), args


# ---------------------------------------------------------------------------------------------------
# running calls


@dataclass(kw_only=True, slots=True)
class ToolLimits:
    timeout_s: float = 30.0
    """Wall-clock time one call may take; past it the model reads a timeout error."""
    max_parallel: int = 8
    """Calls of one turn running at once."""


class ToolEnv:
    """An `Env` whose turns are tool calls: each call runs, each result (or error) is a tool message, in call
    order. A turn without tool calls ends the episode, scored by `answer(text)`. Subclasses write `reset` and
    `answer`."""

    def __init__(self, tools: list[Callable | Tool], limits: ToolLimits | None = None) -> None:
        self.functions = {t.name: t for t in map(tool, tools)}
        if len(self.functions) != len(tools):
            raise ValueError("ToolEnv: two tools have the same name")
        self.tools = [t.schema for t in self.functions.values()]
        self.limits = limits or ToolLimits()

    async def reset(self, sample: Sample, seed: int) -> list[dict]:
        raise NotImplementedError

    async def answer(self, text: str) -> float | None:
        """The reward of the model's final answer (a turn without tool calls)."""
        return None

    async def close(self) -> None:
        pass

    async def step(self, message: dict) -> StepResult:
        calls, errors = message.get("tool_calls") or [], message.get("tool_call_errors") or []
        if not calls and not errors:
            return StepResult(reward=await self.answer(message.get("content") or ""), done=True)
        gate = asyncio.Semaphore(self.limits.max_parallel)

        async def run(call: dict) -> dict:
            async with gate:
                content = await self.call(call["function"]["name"], call["function"]["arguments"])
            return {"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"], "content": content}

        results = await asyncio.gather(*(run(c) for c in calls))
        by_index = {c.get("index", i): r for i, (c, r) in enumerate(zip(calls, results, strict=True))}
        by_index |= {e["index"]: {"role": "tool", "content": e["message"]} for e in errors}
        return StepResult(observations=[by_index[i] for i in sorted(by_index)])

    async def call(self, name: str, arguments: str | dict) -> str:
        """One tool call's result as text (an error message when it cannot run or fails)."""
        if name not in self.functions:
            return f"Error: no tool named {name!r} (tools: {', '.join(self.functions) or 'none'})"
        fn = self.functions[name].fn
        try:
            kwargs = json.loads(arguments) if isinstance(arguments, str) else dict(arguments)
            inspect.signature(fn).bind(**kwargs)
        except (TypeError, json.JSONDecodeError) as e:
            return f"Error: bad arguments for {name}: {e}"
        call = fn(**kwargs) if inspect.iscoroutinefunction(fn) else asyncio.to_thread(fn, **kwargs)
        try:
            result = await asyncio.wait_for(call, self.limits.timeout_s)
        except TimeoutError:
            return f"Error: {name} ran past its {self.limits.timeout_s:g} s limit"
        except Exception as e:  # the tool's failure is the model's observation
            return f"Error: {name} raised {type(e).__name__}: {e}"
        return result if isinstance(result, str) else json.dumps(result, default=str)


def call_id(turn: int, index: int) -> str:
    """Deterministic tool-call ids: the same trajectory gets the same ids on every run."""
    return f"call_{turn}_{index}"


def assistant_message(text: str, calls: list, errors: list, turn: int) -> dict:
    """The OpenAI-shaped assistant message of one sampled turn (`ToolCall`s and `ToolCallError`s)."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [
            {"id": call_id(turn, c.index), "type": "function", "index": c.index,
             "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
            for c in calls
        ]  # fmt: skip
    if errors:
        message["tool_call_errors"] = [
            {"index": e.index, "message": error_observation(e), "raw": e.raw} for e in errors
        ]
    return message
