"""The environment of the built-in `lookup` task (`leagues.rollout.tasks.LookupTask`): the episode's table is
reachable only through a `lookup(key)` tool, and the model's final answer is scored against the value.

    user:       table QXBZ: value of c?
    assistant:  <tool_call>{"name": "lookup", "arguments": {"key": "c"}}</tool_call>
    tool:       17
    assistant:  17                                                    reward 1 (the exact value)

Where it sits: `leagues train --task lookup` runs it through the multi-turn generate function. With the
task's `tools: false` (the no-tool control) the env offers no tool, so a call is answered with an error and
the value can only be guessed.
"""

from leagues.agent.env import ToolEnv, tool
from leagues.types import Sample


class LookupEnv(ToolEnv):
    def __init__(self) -> None:
        super().__init__([])
        self.table: dict[str, str] = {}
        self.key = ""

    async def reset(self, sample: Sample, seed: int) -> list[dict]:
        label = sample.metadata.get("label")
        if not isinstance(label, dict) or not {"table", "key"} <= set(label):
            raise ValueError(f"lookup env: the prompt's label must hold 'table' and 'key', got {label!r}")
        self.table, self.key = dict(label["table"]), label["key"]
        if label.get("tools", True):

            async def lookup(key: str) -> str:
                """The value stored under `key` in this episode's table.

                Args:
                    key: a key of the table
                """
                if key not in self.table:
                    return f"Error: no key {key!r} (keys: {', '.join(self.table)})"
                return self.table[key]

            self.functions = {"lookup": tool(lookup)}
            self.tools = [self.functions["lookup"].schema]
        return [{"role": "user", "content": sample.metadata.get("prompt_text", "")}]

    async def answer(self, text: str) -> float:
        return 1.0 if text.strip() == self.table[self.key] else 0.0
