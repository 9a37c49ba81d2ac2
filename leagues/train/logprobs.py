"""Per-token logprobs and entropy from final hidden states, chunked so [T, V] never exists whole.

The LM head runs on a chunk of tokens at a time; each chunk is recomputed in the backward pass
(activation checkpointing), so the memory peak is one chunk's float32 logits, not the whole batch's.
Temperature follows the engine's definition: `log_softmax(logits.float() / T)` with T a tensor (the
engine divides by a per-row temperature tensor; dividing by a Python float may round differently).
At T = 1 the division is skipped: x / 1 is exact, so the result is bitwise the same, one pass cheaper.

Entropy is a metric unless the loss has an entropy term: then it is computed without grad, so the
backward pass does not carry it. `compiled=True` runs each chunk through `torch.compile`, which fuses
the cast, scaling, log-softmax, gather and entropy into a few passes over the [chunk, V] logits (with a
large vocabulary these memory-bound passes otherwise cost as much as the matmul).

Legend: T tokens, D model dim, V vocab.
"""

import torch
from torch.utils.checkpoint import checkpoint

from leagues.kernels import batch_invariant


def _chunk(hidden_TD, weight_VD, targets_T, temperature, with_entropy: bool, entropy_grad: bool, invariant=False):
    scaled_TV = (batch_invariant.matmul_nt(hidden_TD, weight_VD) if invariant else hidden_TD @ weight_VD.T).float()
    if temperature is not None:
        scaled_TV = scaled_TV / temperature
    logp_TV = batch_invariant.log_softmax(scaled_TV) if invariant else torch.log_softmax(scaled_TV, dim=-1)
    logprobs_T = logp_TV.gather(1, targets_T[:, None])[:, 0]
    if not with_entropy:
        return logprobs_T, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logprobs_T, -(logp_TV.exp() * logp_TV).sum(dim=-1)


_compiled_chunk = None


def _chunk_fn(compiled: bool):
    global _compiled_chunk
    if not compiled:
        return _chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk, dynamic=True)  # chunk sizes differ every step
    return _compiled_chunk


def token_logprobs(
    hidden_TD: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_T: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 2048,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    compiled: bool = False,
    invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of each target under softmax(h·Wᵀ / T), and optionally the entropy of that distribution
    (differentiable only with `entropy_grad`). `invariant`: the product and log-softmax are batch-invariant
    (deterministic mode)."""
    temp = None
    if temperature > 0 and temperature != 1.0:
        temp = torch.tensor(temperature, dtype=torch.float32, device=hidden_TD.device)
    grad = torch.is_grad_enabled() and (hidden_TD.requires_grad or weight_VD.requires_grad)
    fn = _chunk_fn(compiled)
    logprobs, entropies = [], []
    for start in range(0, hidden_TD.shape[0], chunk_size):
        args = (hidden_TD[start : start + chunk_size], weight_VD, targets_T[start : start + chunk_size], temp)
        if grad:
            lp, ent = checkpoint(fn, *args, with_entropy, entropy_grad, invariant, use_reentrant=False)
        else:
            lp, ent = fn(*args, with_entropy, entropy_grad, invariant)
        logprobs.append(lp)
        entropies.append(ent)
    entropy = torch.cat(entropies) if with_entropy else None
    return torch.cat(logprobs), entropy
