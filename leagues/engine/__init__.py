"""The rollout engine: paged KV cache, continuous batching, prefix sharing, CUDA graphs, logprobs, routes.

from leagues.engine import Engine, SamplingParams
engine = Engine("tiny-moe")
outputs = engine.generate(["2+3="], SamplingParams(temperature=0, max_new_tokens=8))
"""

from leagues.engine.engine import Engine, EngineConfig
from leagues.engine.output import Output
from leagues.types import FinishReason, SamplingParams

__all__ = ["Engine", "EngineConfig", "FinishReason", "Output", "SamplingParams"]
