"""The trajectory ledger: the single, token-exact record of a multi-turn sample.

    ledger = Ledger(prompt_ids)                       # the rendered first messages: context, never trained
    ledger.check_request(input_ids)                   # before every engine call: its input is the ledger, exactly
    ledger.append_sampled(ids, logprobs, version)     # the engine's output of one turn, as it sampled it
    ledger.append_context(ids)                        # observations, tool results, template bridges
    ledger.add_routes(routes, start)                  # a request's routed experts from row `start` on (a delta)
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
- Routes are kept per turn as deltas: each request's record adds the rows from the first token no earlier
  request computed (`routes_start`) to its end, so every token's row is the one recorded when the engine
  first computed it (a context token's by the request after it arrived, a sampled token's by the request
  that sampled it), and routing replay covers every token of every turn. A record that starts elsewhere or
  leaves a gap is refused; the rows must cover the trajectory when the sample is made.
- A sample's end is recorded (`Termination`): done, max_turns, length, context, tool_error, abort; an
  aborted trajectory becomes an ABORTED sample (left out of the loss), a length or context end TRUNCATED.

Legend: T tokens of the trajectory, L MoE layers, K top-k.
"""

from dataclasses import dataclass, field
from enum import StrEnum

import torch

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
    route_rows: list = field(default_factory=list)
    """[n, L, K] experts per request, rows of consecutive trajectory tokens from row 0 on (`add_routes`)."""
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

    @property
    def routes_start(self) -> int:
        """The first trajectory token without a route row yet: where the next request's delta starts."""
        return sum(len(rows) for rows in self.route_rows)

    def add_routes(self, routes, start: int | None = None) -> None:
        """A request's routed experts, rows `start` onwards of its input and output but the last token. Without
        `start`, the rows end at the trajectory's last routed token (call it right after `append_sampled`): a
        whole record (an engine without deltas) or a delta (`SamplingParams.routed_experts_start`) alike. Only
        the rows from `routes_start` on are kept; earlier ones were recorded by the request that computed them
        first."""
        have = self.routes_start
        if start is None:
            start = self.num_tokens - 1 - len(routes)
        if start > have:
            raise LedgerError(f"ledger: routes from token {start} leave a gap (rows up to {have} are recorded)")
        end = start + len(routes)
        if start < 0 or end > self.num_tokens - 1:
            raise LedgerError(f"ledger: routes cover {end} tokens, the trajectory has {self.num_tokens - 1} to route")
        if end > have:
            self.route_rows.append(routes[have - start :])

    @property
    def routes(self):
        """[T - 1, L, K] experts of every routed token so far (None when no request returned routes)."""
        if not self.route_rows:
            return None
        return torch.cat(self.route_rows) if len(self.route_rows) > 1 else self.route_rows[0]

    def to_sample(self, termination: Termination, **fields) -> Sample:
        """The trajectory as one `Sample`: the prompt, then everything after it as the response, with the loss
        mask, logprobs, routes and per-token turns and versions (metadata); `fields` go to the `Sample`."""
        termination = Termination(termination)
        routes = self.routes if termination != Termination.ABORT else None  # an aborted request routed part of it
        if routes is not None and len(routes) != self.num_tokens - 1:
            raise LedgerError(
                f"ledger: routes cover {len(routes)} tokens, the trajectory has {self.num_tokens - 1} to route"
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
            routed_experts=routes,
            status=_STATUS[termination],
            weight_version=min(sampled) if sampled else 0,
            metadata=metadata,
            **fields,
        )
