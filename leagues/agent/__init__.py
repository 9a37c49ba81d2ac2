"""Multi-turn agents: the trajectory ledger (token-exact, append-only record of a multi-turn sample).

from leagues.agent import Ledger, Termination
"""

from leagues.agent.ledger import Ledger, LedgerError, Termination
from leagues.agent.render import ChatRender

__all__ = ["Ledger", "LedgerError", "Termination"]
