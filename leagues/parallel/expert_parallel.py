"""Expert parallelism: each rank of an expert group keeps a contiguous slice of every MoE layer's experts,
and tokens travel to the rank that holds their expert and back (all-to-all).

`apply_ep(model, ep_mesh)` swaps every `GroupedExperts` for an `ExpertParallelExperts` holding only this
rank's experts: rank r of the group owns experts [r·E/P, (r+1)·E/P). Its forward is

    dispatch()  sort token-expert pairs by expert (hence by destination rank), exchange per-expert counts,
                send the rows (uneven all-to-all), sort the received rows by local expert
    experts     the same two grouped matmuls and SwiGLU as `GroupedExperts`, on the local experts only
    combine()   undo the local sort, all-to-all the rows back, undo the pair sort, weight by the routing
                weights and sum over k

Decisions:
- The router stays replicated (an ordinary parameter, sharded by FSDP with the rest of the block); only
  `w13`/`w2` are split, so routing, replay and the router's gradient are unchanged.
- Row exchange uses the autograd-aware functional collective `all_to_all_single_autograd` (the successor
  of the deprecated `torch.distributed.nn.functional.all_to_all_single`): its backward is the reverse
  all-to-all, so each local expert's gradient sums the contributions of every rank's tokens (see
  `leagues.parallel.fsdp` for how that composes with FSDP's reduction).
- Split sizes need the counts on the host: one small count all-to-all and one `.tolist()` per layer.
- Every reordering is a gather of a permutation (`permute_rows`), as in `leagues.model.moe`: no atomics,
  the same answer every run. Weights multiply the rows after they come home, so the weighting and the sum
  over k are the single-device model's, element for element.

Legend: T tokens, D model dim, K top-k, E experts (global), L local experts (E/P), P ranks in the expert
group, F expert ffn dim, N = T*K token-expert pairs sent, R rows received.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh

# The kernels through the model: DESIGN.md lets `parallel` import `model` only (the ones moe.py runs).
from leagues.model.moe import GroupedExperts, expert_rows, permute_rows, sum_over_k


@dataclass(slots=True)
class Dispatched:
    """What `combine()` needs to undo `dispatch()`."""

    order_N: torch.Tensor
    inverse_N: torch.Tensor
    local_order_R: torch.Tensor
    local_inverse_R: torch.Tensor
    send_splits: list[int]
    """Rows sent to each rank of the group (and received back in combine)."""
    recv_splits: list[int]
    """Rows received from each rank of the group."""


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def exchange(x_MD: torch.Tensor, recv_splits: list[int], send_splits: list[int], group) -> torch.Tensor:
    """Uneven all-to-all of rows, differentiable (its backward is the reverse exchange)."""
    return all_to_all_single_autograd(x_MD.contiguous(), recv_splits, send_splits, group)


class ExpertParallelExperts(GroupedExperts):
    """This rank's L = E/P experts (w13 [L, 2F, D], w2 [L, D, F]) and the all-to-all around them."""

    def __init__(self, full: GroupedExperts, ep_mesh: DeviceMesh) -> None:
        num_experts, two_ffn, dim = full.w13.shape
        size, rank = ep_mesh.size(), ep_mesh.get_local_rank()
        super().__init__(0, dim, two_ffn // 2)
        self.num_experts, self.num_local = num_experts, num_experts // size
        self.ep_size, self.ep_group = size, ep_mesh.get_group()
        lo, hi = rank * self.num_local, (rank + 1) * self.num_local
        self.w13 = nn.Parameter(full.w13.detach()[lo:hi].clone())
        self.w2 = nn.Parameter(full.w2.detach()[lo:hi].clone())
        self.impl = full.impl
        # Every EP rank holds other experts under the same parameter names; checkpoints need distinct keys.
        self.checkpoint_tag = f"ep{rank}of{size}"

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        x_RD, offs_L, state = self.dispatch(x_TD, ids_TK)
        y_RD = expert_rows(x_RD, offs_L, self.w13, self.w2, self.impl)
        return self.combine(y_RD, weights_TK, state)

    def dispatch(self, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Dispatched]:
        """Rows for the local experts, sorted by local expert, with their cumulative counts `offs_L` (int32)."""
        ids_N = ids_TK.flatten().long()
        order_N = torch.sort(ids_N, stable=True).indices
        inverse_N = inverse_permutation(order_N)
        send_counts_E = torch.bincount(ids_N, minlength=self.num_experts)
        recv_counts_E = torch.empty_like(send_counts_E)
        dist.all_to_all_single(recv_counts_E, send_counts_E, group=self.ep_group)
        recv_counts_PL = recv_counts_E.view(self.ep_size, self.num_local)
        send_splits = send_counts_E.view(self.ep_size, self.num_local).sum(1).tolist()
        recv_splits = recv_counts_PL.sum(1).tolist()

        top_k = ids_TK.shape[1]
        x_ND = permute_rows(x_TD[:, None].expand(-1, top_k, -1).flatten(0, 1), order_N, inverse_N)
        x_RD = exchange(x_ND, recv_splits, send_splits, self.ep_group)
        # Received rows come grouped by source rank, then local expert; the grouped GEMM wants expert first.
        local_ids = torch.arange(self.num_local, device=ids_N.device).repeat(self.ep_size)
        local_ids_R = torch.repeat_interleave(local_ids, recv_counts_PL.flatten())
        local_order_R = torch.sort(local_ids_R, stable=True).indices
        local_inverse_R = inverse_permutation(local_order_R)
        x_RD = permute_rows(x_RD, local_order_R, local_inverse_R)
        offs_L = recv_counts_PL.sum(0).cumsum(0).to(torch.int32)
        state = Dispatched(order_N, inverse_N, local_order_R, local_inverse_R, send_splits, recv_splits)
        return x_RD, offs_L, state

    def combine(self, y_RD: torch.Tensor, weights_TK: torch.Tensor, state: Dispatched) -> torch.Tensor:
        """Expert outputs back on the ranks of their tokens, weighted and summed over k: [T, D]."""
        y_RD = permute_rows(y_RD, state.local_inverse_R, state.local_order_R)
        y_ND = exchange(y_RD, state.send_splits, state.recv_splits, self.ep_group)
        y_ND = permute_rows(y_ND, state.inverse_N, state.order_N)
        num_tokens, top_k = weights_TK.shape
        y_TKD = y_ND.view(num_tokens, top_k, y_ND.shape[-1]) * weights_TK[..., None]
        return sum_over_k(y_TKD, self.impl).to(weights_TK.dtype)


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Split every `GroupedExperts` of `model` over `ep_mesh`, in place (a no-op for a group of one)."""
    if ep_mesh.size() == 1:
        return
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, GroupedExperts) and not isinstance(child, ExpertParallelExperts):
                if child.w13.shape[0] % ep_mesh.size():
                    raise ValueError(f"ep ({ep_mesh.size()}) must divide the number of experts ({child.w13.shape[0]})")
                setattr(module, name, ExpertParallelExperts(child, ep_mesh))
