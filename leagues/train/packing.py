"""From samples to packed micro-batches: no padding, a token budget per micro-batch, balanced ranks.

A sample of P prompt and R response tokens is fed as its first P + R - 1 tokens (the last token
predicts nothing); position t predicts token t + 1, so response token j is scored at position
P - 1 + j. Sequences are never split across micro-batches, which keeps sequence-level losses (GSPO,
sequence means) local to one micro-batch. Routes recorded by the engine cover exactly these P + R - 1
positions, so they line up for routing replay.

- `split_by_tokens`: first-fit decreasing into micro-batches of at most `max_tokens` tokens (a longer
  sequence gets one of its own);
- `balance`: the global batch split across data-parallel ranks by token count (longest first, to the
  least loaded rank), every rank getting at least one sample when there are enough.

Legend: T packed tokens, L MoE layers, K top-k.
"""

import heapq
from dataclasses import dataclass

import torch

from leagues.types import Sample


@dataclass(slots=True)
class MicroBatch:
    input_ids_T: torch.Tensor
    targets_T: torch.Tensor
    mask_T: torch.Tensor
    """1.0 where the target is a trained response token."""
    advantages_T: torch.Tensor
    seq_ids_T: torch.Tensor
    """Index of each token's sample within this micro-batch."""
    lengths: list[int]
    sample_indices: list[int]
    """Indices of the samples in the list the micro-batch was built from."""
    rollout_logprobs_T: torch.Tensor | None = None
    replay_experts_TLK: torch.Tensor | None = None
    values_T: torch.Tensor | None = None
    """The critic's values from before the update (its clipped loss's old values), when every sample has them."""
    returns_T: torch.Tensor | None = None
    """The critic's regression targets, when every sample has them."""

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)


def input_length(sample: Sample) -> int:
    return sample.num_tokens - 1


def split_by_tokens(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into bins of at most `max_tokens` tokens (first-fit decreasing), in stable order."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        target = next((b for b, load in enumerate(loads) if load + lengths[i] <= max_tokens), None)
        if target is None:
            bins.append([])
            loads.append(0)
            target = len(bins) - 1
        bins[target].append(i)
        loads[target] += lengths[i]
    return [sorted(b) for b in bins]


def balance(lengths: list[int], num_ranks: int) -> list[list[int]]:
    """Indices per rank, longest first to the least loaded rank (ties: fewest samples, lowest rank)."""
    heap = [(0, 0, rank) for rank in range(num_ranks)]
    shares: list[list[int]] = [[] for _ in range(num_ranks)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        load, count, rank = heapq.heappop(heap)
        shares[rank].append(i)
        heapq.heappush(heap, (load + lengths[i], count + 1, rank))
    return [sorted(s) for s in shares]


def response_mask(sample: Sample) -> list[float]:
    """The sample's loss mask over its response tokens (all ones when it has none)."""
    if sample.loss_mask is None:
        return [1.0] * len(sample.response_ids)
    if len(sample.loss_mask) != len(sample.response_ids):
        raise ValueError(
            f"loss_mask has {len(sample.loss_mask)} entries for {len(sample.response_ids)} response tokens"
        )
    return [float(m) for m in sample.loss_mask]


def _response_row(sample: Sample, values: list[float] | None, what: str) -> list[float]:
    """A per-response-token list of the sample, checked for length (zeros when it has none)."""
    if values is None:
        return [0.0] * len(sample.response_ids)
    if len(values) != len(sample.response_ids):
        raise ValueError(f"{what} has {len(values)} entries for {len(sample.response_ids)} response tokens")
    return list(values)


def _sample_rows(sample: Sample) -> dict[str, list]:
    tokens = sample.prompt_ids + sample.response_ids
    prompt_pad = [0.0] * (len(sample.prompt_ids) - 1)
    advantages = [sample.advantage] * (len(tokens) - 1)
    if sample.token_advantages is not None:
        advantages = prompt_pad + _response_row(sample, sample.token_advantages, "token_advantages")
    return {
        "input_ids": tokens[:-1],
        "targets": tokens[1:],
        "mask": prompt_pad + response_mask(sample),
        "advantages": advantages,
        "rollout": prompt_pad + _response_row(sample, sample.rollout_logprobs, "rollout_logprobs"),
        "values": prompt_pad + _response_row(sample, sample.values, "values"),
        "returns": prompt_pad + _response_row(sample, sample.returns, "returns"),
    }


def build_microbatch(samples: list[Sample], indices: list[int], device: torch.device | str) -> MicroBatch:
    """Pack `samples[i] for i in indices` into one flat batch on `device`."""
    rows = {
        key: [] for key in ("input_ids", "targets", "mask", "advantages", "rollout", "values", "returns", "seq_ids")
    }
    for seq, i in enumerate(indices):
        sample = samples[i]
        if not sample.response_ids or not sample.prompt_ids:
            raise ValueError(f"sample {i} needs a prompt and at least one response token")
        for key, values in _sample_rows(sample).items():
            rows[key].extend(values)
        rows["seq_ids"].extend([seq] * input_length(sample))
    has = lambda name: all(getattr(samples[i], name) is not None for i in indices)  # noqa: E731
    as_tensor = lambda key, dtype: torch.tensor(rows[key], dtype=dtype, device=device)  # noqa: E731
    return MicroBatch(
        input_ids_T=as_tensor("input_ids", torch.long),
        targets_T=as_tensor("targets", torch.long),
        mask_T=as_tensor("mask", torch.float32),
        advantages_T=as_tensor("advantages", torch.float32),
        seq_ids_T=as_tensor("seq_ids", torch.long),
        lengths=[input_length(samples[i]) for i in indices],
        sample_indices=list(indices),
        rollout_logprobs_T=as_tensor("rollout", torch.float32) if has("rollout_logprobs") else None,
        replay_experts_TLK=_stack_routes(samples, indices, device),
        values_T=as_tensor("values", torch.float32) if has("values") else None,
        returns_T=as_tensor("returns", torch.float32) if has("returns") else None,
    )


def _stack_routes(samples: list[Sample], indices: list[int], device) -> torch.Tensor | None:
    routes = [samples[i].routed_experts for i in indices]
    if all(r is None for r in routes):
        return None
    for i, r in zip(indices, routes, strict=True):
        expected = input_length(samples[i])
        if r is None or r.shape[0] != expected:
            got = None if r is None else tuple(r.shape)
            raise ValueError(f"sample {i}: routed_experts has shape {got}, expected {expected} tokens first")
    return torch.cat([r.to(device) for r in routes])
