"""The `leagues` command: one verb per job, each configured by a dataclass plus dotted overrides.

`main.py` holds the verb table and the shared steps (recipe or YAML, overrides, printing the resolved
config); each built verb has its own file beside its config class (`generate.py`, `convert.py`).
"""


class UsageError(ValueError):
    """Bad user input found while running a verb; `leagues` prints it as one line and exits 2."""


LOOPBACK = ("127.0.0.1", "localhost", "::1")
"""Hosts that keep a server on this machine (`serve` and `router` bind beyond them only with keys)."""
