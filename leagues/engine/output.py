"""What a finished request gives back: one `Output` per sample."""

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from leagues.engine.sequence import Sequence
from leagues.types import FinishReason


@dataclass(kw_only=True, slots=True)
class Output:
    request_id: str
    index: int
    """Sample index within the request (0..n-1)."""
    prompt_token_ids: list[int]
    token_ids: list[int]
    """Generated tokens, including a final eos or stop token id."""
    logprobs: list[float]
    """Logprob of each generated token under softmax(logits / temperature), before truncation."""
    finish_reason: FinishReason
    text: str = ""
    """Decoded output without special tokens, cut before a matched stop string."""
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    routed_experts: torch.Tensor | None = None
    """[prompt + output tokens - 1 - start, MoE layers, top-k] experts of every token the model computed, from
    `SamplingParams.routed_experts_start` on."""
    weight_version: int = 0
    """Weights version that sampled the last token."""
    first_weight_version: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
    arrival_time: float = 0.0
    """`time.monotonic()` when the engine's loop took the request (one clock for every process of a machine)."""
    first_token_time: float = 0.0
    """`time.monotonic()` when the request's first token reached the host (0: none was sampled)."""


@dataclass(slots=True)
class RequestState:
    request_id: str
    future: Future
    seqs: list[Sequence]
    n: int
    routes: dict[int, torch.Tensor] = field(default_factory=dict)
    on_token: Callable[[int, int, float], None] | None = None
    """Called with (sample index, token id, logprob) for every sampled token (streaming)."""
    arrival_time: float = 0.0
    first_token_time: float = 0.0


def _text(seq: Sequence, tokenizer) -> str:
    if tokenizer is None:
        return ""
    text = tokenizer.decode(seq.output_ids, skip_special_tokens=True)
    return text if seq.stop_text_end is None else text[: seq.stop_text_end]


def make_outputs(state: RequestState, tokenizer) -> list[Output]:
    """Outputs in sample order; a request ended before it forked repeats its first sample's state."""
    seqs = sorted(state.seqs, key=lambda s: s.sample_index)
    outputs = []
    for index in range(state.n):
        seq = seqs[index] if index < len(seqs) else seqs[0]
        outputs.append(
            Output(
                request_id=state.request_id,
                index=index,
                prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
                token_ids=seq.output_ids,
                logprobs=list(seq.logprobs),
                finish_reason=seq.finish_reason,
                text=_text(seq, tokenizer),
                top_logprobs=list(seq.top_logprobs),
                routed_experts=state.routes.get(seq.sample_index),
                weight_version=seq.weight_version if seq.weight_version >= 0 else seq.first_weight_version,
                first_weight_version=seq.first_weight_version,
                num_cached_tokens=seq.num_cached_prompt_tokens,
                arrival_time=state.arrival_time,
                first_token_time=state.first_token_time,
            )
        )
    return outputs
