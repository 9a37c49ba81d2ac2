"""Records that cross package boundaries: sampling parameters, finish reasons, samples, weight targets.

Defined once here so the engine, the server, the rollout code and the trainer agree on them. The RL
sample records (`Sample`, `Group`) join this file with the RL loop; `WeightTarget` is what the fleet of
external engines (`leagues.serve.fleet`) hands the weight transports (`leagues.sync`), which know no fleet.
"""

from dataclasses import dataclass, field
from enum import StrEnum


class FinishReason(StrEnum):
    STOP = "stop"
    """An eos token, a stop token id or a stop string ended the output."""
    LENGTH = "length"
    """`max_new_tokens` or the context limit ended the output."""
    ABORT = "abort"
    """The request was aborted."""


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy. Logprobs are always under softmax(logits / temperature) (temperature 1 when greedy),
    before top-p/top-k/min-p truncation, so the trainer can recompute them with the same temperature."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 or 0: no top-k truncation."""
    min_p: float = 0.0
    seed: int | None = None
    """Same seed, same prompt, same weights: same output, whatever else shares the batch."""
    max_new_tokens: int = 128
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    """Stop strings; the output text is cut before the first one (the tokens up to it are kept)."""
    ignore_eos: bool = False
    n: int = 1
    """Samples per prompt; they share the prompt's KV blocks."""
    top_logprobs: int = 0
    """Also return the top-k logprobs (same distribution as `logprobs`) of every generated token."""
    return_routed_experts: bool = False
    """Return the experts each token was routed to, per MoE layer."""
    routed_experts_start: int = 0
    """With `return_routed_experts`: the first token whose row is returned (a multi-turn client holding the rows
    of earlier turns asks only for the new ones)."""

    def __post_init__(self) -> None:
        checks = {
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "min_p": 0 <= self.min_p <= 1,
            "max_new_tokens": self.max_new_tokens >= 0,
            "n": self.n >= 1,
            "top_logprobs": self.top_logprobs >= 0,
            "routed_experts_start": self.routed_experts_start >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"SamplingParams.{name}: invalid value {getattr(self, name)!r}")


class SampleStatus(StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    """Finished by a stop condition (eos, stop token or string)."""
    TRUNCATED = "truncated"
    """Hit max_new_tokens or the context limit."""
    ABORTED = "aborted"
    FAILED = "failed"
    """Generation or reward failed; the error is in `metadata["error"]`."""


@dataclass(kw_only=True, slots=True)
class Sample:
    """One prompt and one response: what rollout produces and the trainer consumes."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] | None = None
    """Per response token, 1 where it is trained on (0 for tool outputs in agent turns); None means all."""
    rollout_logprobs: list[float] | None = None
    """Per response token, the engine's logprob under the sampling temperature."""
    routed_experts: object | None = None
    """Tensor [prompt + response - 1, MoE layers, top-k] of the experts the engine routed each token to."""
    reward: float = 0.0
    advantage: float = 0.0
    """Per-sample advantage, broadcast to every trained token."""
    token_advantages: list[float] | None = None
    """Per response token, the advantage of a token-level estimator (GAE); None: `advantage` on every token."""
    values: list[float] | None = None
    """Per response token, the critic's value of the state before it, computed once per rollout batch."""
    returns: list[float] | None = None
    """Per response token, the critic's regression target (GAE's advantage + value)."""
    group_id: int = 0
    """Index of the prompt group (the n samples of one prompt share it)."""
    status: SampleStatus = SampleStatus.PENDING
    weight_version: int = 0
    """Weights version that sampled the response (a continued partial-rollout sample: the oldest of its tokens')."""
    token_versions: list[int] | None = None
    """Per response token, the weights version that sampled it (a partial rollout continues a sample under
    newer weights); None means every token was sampled at `weight_version`."""
    metadata: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True, slots=True)
class WeightTarget:
    """An external engine that is to take the next weights: the fleet chooses it, a weight transport sends."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    """What every request to it carries: `Authorization: Bearer <key>` for an engine behind the run's key."""
    rejoining: bool = False
    """It does not serve the fleet's weights now (quarantined, or at another version: restarted, say), so a
    transport that keeps state with its engines (a weight-update group) sets that state up again."""
