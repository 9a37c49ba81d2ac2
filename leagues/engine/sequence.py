"""One generation in flight: its tokens, its KV blocks, what it has produced.

A request with `n` samples starts as one sequence; when its prompt has been computed it forks into
`n` sequences that share the prompt's KV blocks (see `block_manager.py`), each sampling its own
tokens with its own seed. The scheduler moves sequences between `waiting` and `running`; the engine
finishes them.
"""

from dataclasses import dataclass, field
from enum import StrEnum

from leagues.engine.sampler import int64_pattern, row_seed, samples_in_step
from leagues.types import FinishReason, SamplingParams

PENDING = -1
"""The placeholder of a token sampled by a step in flight (overlap scheduling): replaced when the step lands."""


class SeqStatus(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    request_id: str
    sample_index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    num_forks: int = 0
    """Sibling samples still to fork off once the prompt is computed (n - 1, then 0)."""
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose keys and values are in the cache."""
    block_hashes: list[int] = field(default_factory=list)
    """Chained hashes of the leading full blocks registered in the prefix cache."""
    num_cached_prompt_tokens: int = 0
    """Prompt tokens served from the prefix cache at admission (a metric)."""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_text_end: int | None = None
    """Where a stop string starts in the output text, when one ended the sequence."""
    first_weight_version: int = -1
    weight_version: int = -1
    in_step: bool = field(init=False)
    """`sampler.samples_in_step(params)`: a decode step can sample this sequence itself (read once: the engine's
    hot loop checks it every step, and a request's params do not change while it runs)."""
    step_seed: int = field(init=False)
    """The seed a decode step samples this sequence with: `row_seed(seed, sample_index)` as an int64 pattern."""

    def __post_init__(self) -> None:
        self.in_step = samples_in_step(self.params)
        self.step_seed = int64_pattern(row_seed(self.seed, self.sample_index))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens to compute before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    def block_tokens(self, index: int, block_size: int) -> tuple[int, ...]:
        return tuple(self.token_ids[index * block_size : (index + 1) * block_size])
