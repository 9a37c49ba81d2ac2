"""An env a test run names by `--env tests.agent.envs_for_tests:Counter`: every turn gets a tool message, the
reward is the number of characters of the model's first turn (so it varies between samples)."""

from leagues.agent.env import StepResult


class Counter:
    tools = [{"type": "function", "function": {"name": "noop", "description": "Nothing.", "parameters": {}}}]

    async def reset(self, sample, seed):
        self.turns = []
        return [{"role": "user", "content": sample.metadata["prompt_text"]}]

    async def step(self, message):
        self.turns.append(message["content"])
        return StepResult(observations=[{"role": "tool", "content": "more"}], reward=float(len(self.turns[0])))

    async def close(self):
        pass
