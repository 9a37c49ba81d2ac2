"""Batch-invariant reference kernels: each output row depends only on its own inputs, bit for bit, whatever
else is in the batch (deterministic mode, on the CPU).

A library matmul picks its blocking, and for small row counts even its algorithm, by the batch shape, so
row r of `x @ w.T` can round differently at M = 1 (decode) and M = 300 (a packed training batch). Here a
product is an elementwise multiply and a sum over the last (contiguous) axis, whose reduction order depends
only on that axis's length. Attention pads every sequence's keys to one fixed length, so each softmax row
and each weighted sum reduce over the same number of elements in prefill, decode and training alike.
These are slow references (M x N x K intermediates): the engine and the trainer use them for small models
in tests; GPU batch-invariant kernels are a separate piece of work.

Legend: M rows, N outputs, K inputs, Q queries, P padded keys, H query heads, G kv heads, A head dim,
N rows of experts (sorted), E experts.
"""

import torch


def matmul_nt(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x @ w.T with a per-row reduction order that does not depend on M."""
    return (x_MK[:, None, :] * w_NK[None, :, :]).sum(dim=-1)


def linear(x: torch.Tensor, weight_NK: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    out = matmul_nt(x.reshape(-1, x.shape[-1]), weight_NK).reshape(*x.shape[:-1], weight_NK.shape[0])
    return out if bias_N is None else out + bias_N


def grouped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Each expert's sorted rows times its weight, row-invariant (see `grouped_gemm.grouped_mm_reference`)."""
    bounds = [0, *offs_E.tolist()]
    outs = [matmul_nt(x_NI[bounds[e] : bounds[e + 1]], w_EOI[e]) for e in range(w_EOI.shape[0])]
    return torch.cat(outs, dim=0) if outs else x_NI.new_empty(0, w_EOI.shape[1])


def attention(
    q_QHA: torch.Tensor, k_KGA: torch.Tensor, v_KGA: torch.Tensor, pos_Q: torch.Tensor, pad_to: int, scale: float
) -> torch.Tensor:
    """Causal attention of one sequence's queries (at absolute positions `pos_Q`) over its keys 0..K-1,
    keys padded to `pad_to` so every row reduces over the same length."""
    num_keys, group = k_KGA.shape[0], q_QHA.shape[1] // k_KGA.shape[1]
    if num_keys > pad_to:
        raise ValueError(f"sequence of {num_keys} tokens exceeds the deterministic attention length {pad_to}")
    pad = (0, 0, 0, 0, 0, pad_to - num_keys)
    k_PHA = torch.nn.functional.pad(k_KGA.float(), pad).repeat_interleave(group, dim=1)
    v_PHA = torch.nn.functional.pad(v_KGA.float(), pad).repeat_interleave(group, dim=1)
    q_HQA, k_HPA, v_HAP = q_QHA.float().transpose(0, 1), k_PHA.transpose(0, 1), v_PHA.permute(1, 2, 0)
    scores_HQP = (q_HQA[:, :, None, :] * k_HPA[:, None, :, :]).sum(dim=-1) * scale
    mask_QP = torch.arange(pad_to, device=q_QHA.device)[None, :] <= pos_Q[:, None]
    probs_HQP = scores_HQP.masked_fill(~mask_QP[None], float("-inf")).softmax(dim=-1)
    out_HQA = (probs_HQP[:, :, None, :] * v_HAP[:, None, :, :]).sum(dim=-1)
    return out_HQA.transpose(0, 1).to(q_QHA.dtype)
