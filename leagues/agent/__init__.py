"""Multi-turn agents: the trajectory ledger (token-exact, append-only record of a multi-turn sample), chat
rendering with token bridges (append-only templates only), the parsers of the model's tool calls, and
environments with tools (the `Env` protocol, `ToolEnv`, tools from functions, the Python sandbox).

    from leagues.agent import ChatRender, Env, Ledger, StepResult, Termination, ToolEnv, parse_tool_calls, tool

The multi-turn generate function (`leagues.agent.multi_turn`) and `--agent` runs (`.agents`, over the HTTP
front's sessions, `leagues.serve.sessions`) build on the rollout package and are imported from their modules,
so that importing this package stays light (the HTTP front imports the tool-call parsers).
"""

from leagues.agent.env import Env, StepResult, Tool, ToolEnv, ToolLimits, tool
from leagues.agent.ledger import Ledger, LedgerError, Termination
from leagues.agent.render import ChatRender
from leagues.agent.sandbox import PythonSandbox
from leagues.agent.tool_calls import TOOL_CALL_PARSERS, ToolCall, ToolCallError, error_observation, parse_tool_calls

__all__ = [
    "TOOL_CALL_PARSERS",
    "ChatRender",
    "Env",
    "PythonSandbox",
    "StepResult",
    "Tool",
    "ToolEnv",
    "ToolLimits",
    "tool",
    "Ledger",
    "LedgerError",
    "Termination",
    "ToolCall",
    "ToolCallError",
    "error_observation",
    "parse_tool_calls",
]
