"""Per-token logprobs and entropy from final hidden states, chunked so [T, V] never exists whole.

The LM head runs on a chunk of tokens at a time; each chunk is recomputed in the backward pass
(activation checkpointing), so the memory peak is one chunk's float32 logits, not the whole batch's.
Temperature follows the engine's definition: `log_softmax(logits.float() / T)` with T a tensor (the
engine divides by a per-row temperature tensor; dividing by a Python float may round differently).

Legend: T tokens, D model dim, V vocab.
"""

import torch
from torch.utils.checkpoint import checkpoint


def _chunk(hidden_TD, weight_VD, targets_T, temperature, with_entropy: bool):
    scaled_TV = (hidden_TD @ weight_VD.T).float() / temperature
    logp_TV = torch.log_softmax(scaled_TV, dim=-1)
    logprobs_T = logp_TV.gather(1, targets_T[:, None])[:, 0]
    if not with_entropy:
        return logprobs_T, None
    return logprobs_T, -(logp_TV.exp() * logp_TV).sum(dim=-1)


def token_logprobs(
    hidden_TD: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_T: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 2048,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of each target under softmax(h·Wᵀ / T), and optionally the entropy of that distribution."""
    temp = torch.tensor(temperature if temperature > 0 else 1.0, dtype=torch.float32, device=hidden_TD.device)
    grad = torch.is_grad_enabled() and (hidden_TD.requires_grad or weight_VD.requires_grad)
    logprobs, entropies = [], []
    for start in range(0, hidden_TD.shape[0], chunk_size):
        args = (hidden_TD[start : start + chunk_size], weight_VD, targets_T[start : start + chunk_size], temp)
        if grad:
            lp, ent = checkpoint(_chunk, *args, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk(*args, with_entropy)
        logprobs.append(lp)
        entropies.append(ent)
    entropy = torch.cat(entropies) if with_entropy else None
    return torch.cat(logprobs), entropy
