"""Tool calls in a model's sampled text: parsed by a registry of per-family parsers, never edited.

    calls, errors = parse_tool_calls(text, "hermes")
    # Qwen / Hermes blocks: <tool_call>{"name": ..., "arguments": {...}}</tool_call>

Where it sits: a multi-turn generate function parses each turn's output text; valid calls run as tools, and
each error becomes an observation the model reads next turn (`error_observation`). The sampled tokens stay
in the ledger as sampled: a malformed call is the model's own action, so it is trained on as it was made.

Decisions:
- A parser returns every call it could read and one `ToolCallError` per block it could not (bad JSON, no
  name, arguments that are not an object, an unclosed block), each naming what is wrong and where (the
  block's index), so nothing is dropped silently.
- `TOOL_CALL_PARSERS` is a registry: a family with another format registers its own function.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)
    index: int = 0
    """Position of the call among the turn's call blocks."""


@dataclass(slots=True)
class ToolCallError:
    index: int
    message: str
    raw: str
    """The block's text as sampled."""


Parser = Callable[[str], tuple[list[ToolCall], list[ToolCallError]]]
TOOL_CALL_PARSERS: dict[str, Parser] = {}


def register_parser(name: str) -> Callable[[Parser], Parser]:
    def add(fn: Parser) -> Parser:
        TOOL_CALL_PARSERS[name] = fn
        return fn

    return add


def parse_tool_calls(text: str, parser: str = "hermes") -> tuple[list[ToolCall], list[ToolCallError]]:
    """The tool calls in `text` by the named parser, and what could not be read."""
    if parser not in TOOL_CALL_PARSERS:
        raise ValueError(
            f"tool call parser {parser!r} is not registered (known: {', '.join(sorted(TOOL_CALL_PARSERS))})"
        )
    return TOOL_CALL_PARSERS[parser](text)


_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


@register_parser("hermes")
def parse_hermes(text: str) -> tuple[list[ToolCall], list[ToolCallError]]:
    """Qwen / Hermes blocks: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (arguments may be a
    JSON-encoded string, as some models write them)."""
    calls, errors = [], []
    for index, match in enumerate(_HERMES_BLOCK.finditer(text)):
        raw, closed = match.group(1), bool(match.group(2))
        call, problem = _read_call(raw.strip(), index) if closed else (None, "the block is not closed (</tool_call>)")
        if call is None:
            errors.append(ToolCallError(index, f"tool call {index}: {problem}", raw))
        else:
            calls.append(call)
    return calls, errors


def _read_call(raw: str, index: int) -> tuple[ToolCall | None, str]:
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as err:
        return None, f"invalid JSON ({err.msg} at character {err.pos})"
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
        return None, 'expected an object with a "name" string'
    arguments = body.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            return None, f'"arguments" is a string that is not JSON ({err.msg})'
    if not isinstance(arguments, dict):
        return None, '"arguments" must be an object'
    return ToolCall(body["name"], arguments, index), ""


def error_observation(error: ToolCallError) -> str:
    """What the model is told about a call it made that could not be read (its next turn's observation)."""
    return f'Error: {error.message}. Write the call as <tool_call>{{"name": ..., "arguments": {{...}}}}</tool_call>.'
