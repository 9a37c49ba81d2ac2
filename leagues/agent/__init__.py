"""Multi-turn agents: the trajectory ledger (token-exact, append-only record of a multi-turn sample), chat
rendering with token bridges (append-only templates only), and the parsers of the model's tool calls.

    from leagues.agent import ChatRender, Ledger, Termination, parse_tool_calls
"""

from leagues.agent.ledger import Ledger, LedgerError, Termination
from leagues.agent.render import ChatRender
from leagues.agent.tool_calls import TOOL_CALL_PARSERS, ToolCall, ToolCallError, error_observation, parse_tool_calls

__all__ = [
    "TOOL_CALL_PARSERS",
    "ChatRender",
    "Ledger",
    "LedgerError",
    "Termination",
    "ToolCall",
    "ToolCallError",
    "error_observation",
    "parse_tool_calls",
]
