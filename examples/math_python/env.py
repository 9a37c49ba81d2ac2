"""Math with a Python tool (ReTool style): the model may run Python in a sandbox while it solves a problem,
and is rewarded for a final `\\boxed{}` answer equivalent to the label (math-verify).

    leagues train --model /path/to/Qwen3-30B-A3B --data math.jsonl --env examples.math_python.env:MathPython \\
        --agent.max_turns 8 --agent.max_tokens 8192 --agent.tool_timeout_s 20 --rollout.max_response_len 2048

`math.jsonl` holds `{"prompt": "...", "label": "..."}` rows (the label the reference answer). Run it from the
repository root (so `examples` is importable) with `--data.chat_template false`: the env builds the messages.
"""

from leagues.agent.env import ToolEnv
from leagues.agent.sandbox import PythonSandbox
from leagues.rollout.verifiers import math_reward

SYSTEM = (
    "Solve the problem. You may run Python with the python tool (print what you need to see); "
    "put the final answer in \\boxed{}."
)


class MathPython(ToolEnv):
    def __init__(self) -> None:
        super().__init__([PythonSandbox(cpu_s=10, memory_mb=1024, wall_s=20).tool()])
        self.problem, self.label = "", ""

    async def reset(self, sample, seed):
        self.problem, self.label = sample.metadata.get("prompt_text", ""), sample.metadata.get("label")
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.problem}]

    async def answer(self, text: str) -> float:
        return math_reward(self.problem, text, self.label, {})
