"""The trajectory ledger: the single, token-exact record of a multi-turn sample.

    ledger = Ledger(prompt_ids)                       # the rendered first messages: context, never trained
    ledger.check_request(input_ids)                   # before every engine call: its input is the ledger, exactly
    ledger.append_sampled(ids, logprobs, version)     # the engine's output of one turn, as it sampled it
    ledger.append_context(ids)                        # observations, tool results, template bridges
    ledger.set_routes(routes)                         # the latest request's routed experts (whole sequence)
    sample = ledger.to_sample(Termination.DONE)       # what rollout hands on: one `Sample`

Where it sits: a multi-turn generate function keeps one ledger per sample; the ledger turns into the `Sample`
the trainer consumes, whose loss mask is 1 exactly on the tokens the engine sampled.

Decisions:
- Append-only, two mutations: tokens the engine sampled (mask 1, its logprob, the turn, the weight version
  that sampled it) and context (mask 0, logprob 0, version -1). Nothing is ever re-tokenized or edited:
  text is rendered to ids once, by the caller, and the ids are what the trainer sees.
- `check_request` compares the next request's input ids with the ledger's tokens and raises naming the first
  position that differs: re-tokenizing text between turns, a template that is not append-only, or a
  dropped separator shows up at the turn that caused it, not as a silent logprob mismatch in training.
- Routes: the engine returns the experts of every token it computed for a request (its whole input plus
  the output, minus the last token), prefix-cached tokens included, so the latest request's record covers
  every earlier turn too; the ledger keeps that one and checks its length when the sample is made.
- A sample's end is recorded (`Termination`): done, max_turns, length, context, tool_error, abort; an
  aborted trajectory becomes an ABORTED sample (left out of the loss), a length or context end TRUNCATED.

Legend: T tokens of the trajectory, L MoE layers, K top-k.
"""

from dataclasses import dataclass, field
from enum import StrEnum

from leagues.types import Sample, SampleStatus


class Termination(StrEnum):
    DONE = "done"
    MAX_TURNS = "max_turns"
    LENGTH = "length"
    CONTEXT = "context"
    TOOL_ERROR = "tool_error"
    ABORT = "abort"


_STATUS = {
    Termination.DONE: SampleStatus.COMPLETED,
    Termination.MAX_TURNS: SampleStatus.TRUNCATED,
    Termination.LENGTH: SampleStatus.TRUNCATED,
    Termination.CONTEXT: SampleStatus.TRUNCATED,
    Termination.TOOL_ERROR: SampleStatus.COMPLETED,
    Termination.ABORT: SampleStatus.ABORTED,
}


class LedgerError(ValueError):
    """A request or an append that would break the ledger's token-exactness."""


@dataclass(slots=True)
class Ledger:
    prompt_ids: list[int]
    """The first rendered messages (and tool schemas): context the model never sampled."""
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    """The turn (0-based: the number of sampled appends before it) each token was added in."""
    versions: list[int] = field(default_factory=list)
    """The weight version that sampled each token; -1 for context."""
    routes: object | None = None
    """[T - 1, L, K] experts of the latest request (set by `set_routes`)."""
    num_turns: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise LedgerError("ledger: the prompt is empty")
        if self.token_ids:
            raise LedgerError("ledger: start from the prompt alone; add tokens with the append methods")
        self._add(self.prompt_ids, mask=0, logprobs=[0.0] * len(self.prompt_ids), version=-1)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def _add(self, ids: list[int], mask: int, logprobs: list[float], version: int) -> None:
        if any(not isinstance(t, int) or t < 0 for t in ids):
            raise LedgerError(f"ledger: token ids must be non-negative ints, got {ids[:8]}...")
        self.token_ids += ids
        self.loss_mask += [mask] * len(ids)
        self.logprobs += logprobs
        self.turns += [self.num_turns] * len(ids)
        self.versions += [version] * len(ids)

    def check_request(self, input_ids: list[int]) -> None:
        """Raise unless `input_ids` (the next engine request's input) are exactly the ledger's tokens."""
        if list(input_ids) == self.token_ids:
            return
        first = next((i for i, (a, b) in enumerate(zip(input_ids, self.token_ids, strict=False)) if a != b), None)
        if first is None:
            first = min(len(input_ids), len(self.token_ids))
        raise LedgerError(
            f"ledger: the request's input differs from the trajectory at token {first} of {len(self.token_ids)} "
            f"(turn {self.turns[min(first, len(self.turns) - 1)]}): input {list(input_ids[first : first + 4])}, "
            f"ledger {self.token_ids[first : first + 4]}"
        )

    def append_sampled(self, token_ids: list[int], logprobs: list[float], weight_version: int) -> None:
        """One turn of the engine's output, as sampled (its own stop token included): trained on."""
        if len(token_ids) != len(logprobs):
            raise LedgerError(f"ledger: {len(token_ids)} sampled tokens but {len(logprobs)} logprobs")
        self._add(list(token_ids), mask=1, logprobs=[float(x) for x in logprobs], version=weight_version)
        self.num_turns += 1

    def append_context(self, token_ids: list[int]) -> None:
        """Tokens the model did not sample (observations, tool results, template bridges): never trained on."""
        self._add(list(token_ids), mask=0, logprobs=[0.0] * len(token_ids), version=-1)

    def set_routes(self, routes) -> None:
        """The routed experts of the latest request: rows for every token of its input and output but the last."""
        self.routes = routes

    def to_sample(self, termination: Termination, **fields) -> Sample:
        """The trajectory as one `Sample`: the prompt, then everything after it as the response, with the loss
        mask, logprobs, routes and per-token turns and versions (metadata); `fields` go to the `Sample`."""
        termination = Termination(termination)
        if self.routes is not None and len(self.routes) != self.num_tokens - 1:
            raise LedgerError(
                f"ledger: routes cover {len(self.routes)} tokens, the trajectory has {self.num_tokens - 1} to route"
            )
        start = len(self.prompt_ids)
        sampled = [v for v, m in zip(self.versions, self.loss_mask, strict=True) if m]
        metadata = fields.pop("metadata", {}) | {
            "termination": str(termination),
            "num_turns": self.num_turns,
            "token_turns": self.turns[start:],
            "token_versions": self.versions[start:],
        }
        return Sample(
            prompt_ids=list(self.prompt_ids),
            response_ids=self.token_ids[start:],
            loss_mask=self.loss_mask[start:],
            rollout_logprobs=self.logprobs[start:],
            routed_experts=self.routes,
            status=_STATUS[termination],
            weight_version=min(sampled) if sampled else 0,
            metadata=metadata,
            **fields,
        )
