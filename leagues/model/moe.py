"""Mixture-of-experts MLP: router, grouped experts, optional shared expert, routing capture and replay.

Token-choice routing: softmax over the router logits in float32, top-k, optional renormalisation.
Routing *replay* swaps only the choice of experts: given ids recorded elsewhere (the engine during
rollout, or an earlier pass), the weights are still the router's probabilities at those ids, so the
router keeps receiving gradients.

Decode-sized inference batches on CUDA run `leagues.kernels.fused_moe` instead (route, gate/up, down, plus
one alignment kernel when experts see several rows: no sort, no permutation; at a few tokens the router's
logits come from `leagues.kernels.gemv` and the route kernel only picks the top-k); so does deterministic mode on
CUDA at every batch size (`batch_invariant.moe_route` / `moe_experts`). Experts are stacked `[E, ...]`
tensors. Otherwise token-expert pairs are sorted by expert and run through two
grouped matmuls (`leagues.kernels.grouped_gemm`: `torch._grouped_mm` on CUDA/bf16, a loop elsewhere).
Tokens are repeated k times and permuted into expert order; results are scaled by their routing
weight, permuted back and summed over k. Every move is a gather of a permutation (backward too), so
the dispatch and combine are free of atomics: fast in bf16 and the same answer every run.

Legend: T tokens, D model dim, E experts, K top-k, F expert ffn dim, N = T*K token-expert pairs.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leagues.kernels import batch_invariant, fused_moe, gemv, grouped_gemm
from leagues.model.config import ModelConfig
from leagues.model.layers import GatedMLP


@dataclass(slots=True)
class Routing:
    weights_TK: torch.Tensor
    expert_ids_TK: torch.Tensor
    logits_TE: torch.Tensor


class _PermuteRows(torch.autograd.Function):
    """Rows of x in the order of a permutation; the backward gathers with the inverse permutation.

    Autograd's own backward for `index_select` is an `index_add` (atomics, slow in bf16); for a
    permutation a second gather is exact, deterministic and several times faster.
    """

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, perm_N: torch.Tensor, inverse_N: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse_N)
        return x_ND.index_select(0, perm_N)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        (inverse_N,) = ctx.saved_tensors
        return grad_ND.index_select(0, inverse_N), None, None


def permute_rows(x_ND: torch.Tensor, perm_N: torch.Tensor, inverse_N: torch.Tensor) -> torch.Tensor:
    return _PermuteRows.apply(x_ND, perm_N, inverse_N)


def grouped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor, impl: str) -> torch.Tensor:
    """The experts' grouped matmul; the "invariant" impl (deterministic mode) keeps each row's result
    independent of the batch, the others dispatch in `grouped_gemm`."""
    if impl == "invariant":
        return batch_invariant.grouped_mm(x_NI, w_EOI, offs_E)
    return grouped_gemm.grouped_mm(x_NI, w_EOI, offs_E, impl)


def sum_over_k(y_TKD: torch.Tensor, impl: str) -> torch.Tensor:
    """Each token's weighted expert outputs summed; in index order for the "invariant" impl (deterministic mode:
    a library reduction may change its tree with the number of rows)."""
    return batch_invariant.sum_rows(y_TKD) if impl == "invariant" else y_TKD.sum(dim=1)


_PAIRWISE_MAX_ROWS = 2048
"""Up to this many (token, expert) pairs (decode-sized batches) the order is counted pairwise, not sorted."""


def expert_order(
    ids_N: torch.Tensor, num_experts: int, pairwise: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stable sort of pairs by expert, as (order_N, inverse_N, offs_E int32 cumulative rows per expert),
    without a host sync. Few pairs on CUDA: each pair's rank among the earlier pairs of its expert is counted from
    an [N, N] comparison, a couple of fused kernels where a GPU sort of int64 keys costs tens of
    microseconds; the permutation is the stable sort's, bit for bit. `pairwise`: force one way (tests)."""
    num_rows = ids_N.shape[0]
    arange_N = torch.arange(num_rows, device=ids_N.device)
    if pairwise is None:  # on the CPU a sort is cheap and N x N is not
        pairwise = ids_N.is_cuda and num_rows <= _PAIRWISE_MAX_ROWS
    if not pairwise:
        sorted_ids_N, order_N = torch.sort(ids_N, stable=True)
        inverse_N = torch.empty_like(order_N).scatter_(0, order_N, arange_N)
        # Cumulative rows per expert without a host sync (bincount on CUDA reads its max back).
        bounds_E = torch.arange(1, num_experts + 1, device=ids_N.device, dtype=sorted_ids_N.dtype)
        return order_N, inverse_N, torch.searchsorted(sorted_ids_N, bounds_E).to(torch.int32)
    counts_E = F.one_hot(ids_N, num_experts).sum(0)
    offs_E = counts_E.cumsum(0)
    earlier_NN = (ids_N[:, None] == ids_N[None, :]) & (arange_N[None, :] < arange_N[:, None])
    inverse_N = (offs_E - counts_E)[ids_N] + earlier_NN.sum(1)
    order_N = torch.empty_like(inverse_N).scatter_(0, inverse_N, arange_N)
    return order_N, inverse_N, offs_E.to(torch.int32)


class Router(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias that steers which experts are picked
        # but not how their outputs are weighted. Zero unless a trainer updates it (adding 0.0 is exact, so a
        # zero bias routes bit for bit as without one); not part of HF checkpoints (non-persistent).
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=False)
        self.invariant = False
        """Deterministic mode: the router's product is batch-invariant."""

    def forward(self, x_TD: torch.Tensor, replay_ids_TK: torch.Tensor | None = None) -> Routing:
        if self.invariant and batch_invariant.uses_triton(x_TD):
            weights_TK, ids_TK, logits_TE = batch_invariant.moe_route(
                x_TD, self.weight, self.expert_bias, self.top_k, self.norm_topk_prob, replay_ids_TK, self.weights_at
            )
            return Routing(weights_TK.to(x_TD.dtype), ids_TK, logits_TE)
        if self.invariant:
            logits_TE = batch_invariant.linear(x_TD, self.weight)
            probs_TE = batch_invariant.softmax(logits_TE)
        else:
            logits_TE = F.linear(x_TD, self.weight)
            probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        if replay_ids_TK is None:
            ids_TK = torch.topk(probs_TE + self.expert_bias, self.top_k, dim=-1).indices
            weights_TK = probs_TE.gather(1, ids_TK)
        else:
            ids_TK = replay_ids_TK.to(device=x_TD.device, dtype=torch.long)
            weights_TK = probs_TE.gather(1, ids_TK)
        if self.norm_topk_prob:
            total_T1 = batch_invariant.sum_rows(weights_TK[:, :, None]) if self.invariant else weights_TK.sum(-1, True)
            weights_TK = weights_TK / total_T1
        return Routing(weights_TK.to(x_TD.dtype), ids_TK, logits_TE)

    def weights_at(self, x_TD: torch.Tensor, w_ED: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        """float32 routing weights of the experts `ids_TK` (the ordinary ops: deterministic mode's backward)."""
        weights_TK = torch.softmax(F.linear(x_TD, w_ED), dim=-1, dtype=torch.float32).gather(1, ids_TK)
        return weights_TK / weights_TK.sum(-1, keepdim=True) if self.norm_topk_prob else weights_TK


def experts_ordinary(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF, impl: str = "auto") -> torch.Tensor:
    """Pairs sorted by expert through two grouped matmuls, weighted, permuted back and summed over k."""
    num_tokens, top_k = ids_TK.shape
    order_N, inverse_N, offs_E = expert_order(ids_TK.flatten(), w13_EFD.shape[0])
    x_ND = permute_rows(x_TD[:, None].expand(-1, top_k, -1).flatten(0, 1), order_N, inverse_N)
    gate_NF, up_NF = grouped_mm(x_ND, w13_EFD, offs_E, impl).chunk(2, dim=-1)
    y_ND = grouped_mm(F.silu(gate_NF) * up_NF, w2_EDF, offs_E, impl)
    y_ND = y_ND * permute_rows(weights_TK.flatten()[:, None], order_N, inverse_N)
    y_TKD = permute_rows(y_ND, inverse_N, order_N).view(num_tokens, top_k, y_ND.shape[-1])
    return sum_over_k(y_TKD, impl)


def _grouped_rows(x_RD, w13_LFD, w2_LDF, offs_L, impl: str) -> torch.Tensor:
    gate_RF, up_RF = grouped_mm(x_RD, w13_LFD, offs_L, impl).chunk(2, dim=-1)
    return grouped_mm(F.silu(gate_RF) * up_RF, w2_LDF, offs_L, impl)


def expert_rows(x_RD, offs_L, w13_LFD, w2_LDF, impl: str) -> torch.Tensor:
    """Rows sorted by expert (`offs_L` cumulative rows per expert) through their experts, before any routing
    weight: [R, D] (expert parallelism's received rows). Deterministic mode on CUDA computes them with the
    tiles one rank's layer uses (`batch_invariant.moe_rows`), in float32: the routing weight and the top-k sum
    then give that layer's numbers bit for bit."""
    if impl == "invariant" and batch_invariant.uses_triton(x_RD):
        counts_L = torch.diff(offs_L.long(), prepend=offs_L.new_zeros(1, dtype=torch.long))
        ids_R = torch.repeat_interleave(torch.arange(len(counts_L), device=x_RD.device), counts_L)

        def reference(x, ids, w13, w2):
            return _grouped_rows(x, w13, w2, offs_L, "auto").float()

        return batch_invariant.moe_rows(x_RD, ids_R, w13_LFD, w2_LDF, reference)
    return _grouped_rows(x_RD, w13_LFD, w2_LDF, offs_L, impl)


class GroupedExperts(nn.Module):
    """E SwiGLU experts: w13 [E, 2F, D] (gate and up fused), w2 [E, D, F]."""

    def __init__(self, num_experts: int, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * ffn_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))
        self.impl = "auto"
        """"auto", "grouped" or "reference" (see `leagues.kernels.grouped_gemm`)."""

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        if self.impl == "invariant" and batch_invariant.uses_triton(x_TD):
            return batch_invariant.moe_experts(x_TD, weights_TK, ids_TK, self.w13, self.w2, experts_ordinary)
        return experts_ordinary(x_TD, weights_TK, ids_TK, self.w13, self.w2, self.impl)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.router = Router(cfg.dim, cfg.num_experts, cfg.top_k, cfg.norm_topk_prob)
        self.experts = GroupedExperts(cfg.num_experts, cfg.dim, cfg.expert_ffn_dim)
        self.shared = GatedMLP(cfg.dim, cfg.shared_expert_ffn_dim) if cfg.shared_expert_ffn_dim else None
        self.shared_gate = nn.Linear(cfg.dim, 1, bias=False) if cfg.shared_expert_gate else None

    def forward(self, x_TD: torch.Tensor, replay_ids_TK: torch.Tensor | None = None, sum_pairs: bool = True):
        """(output, routing). The output is [T, D]; with `sum_pairs=False` the tiled decode path and deterministic
        mode's experts on CUDA without gradients (no shared expert either way) return their per-pair outputs
        [T, K, D] in float32 instead, whose sum over K is the caller's (`transformer.add_norm`,
        `batch_invariant.add_rms_norm`: one kernel with the residual add and the next norm)."""
        fused = self._fused(x_TD) if replay_ids_TK is None else None
        if fused is not None:
            routing, out_TD = self._forward_fused(x_TD, fused, sum_pairs)
        else:
            routing = self.router(x_TD, replay_ids_TK)
            weights_TK, ids_TK = routing.weights_TK, routing.expert_ids_TK
            if not sum_pairs and self._invariant_pairs(x_TD):
                out_TD = batch_invariant.moe_pairs(x_TD, weights_TK, ids_TK, self.experts.w13, self.experts.w2)
            else:
                out_TD = self.experts(x_TD, weights_TK, ids_TK)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD
        return out_TD, routing

    def _invariant_pairs(self, x_TD: torch.Tensor) -> bool:
        """Deterministic mode's experts may hand their pair outputs over unsummed: on CUDA, without gradients
        (the trainer's backward recomputes from summed outputs), all experts on this rank, no shared expert."""
        experts = self.experts
        if type(experts) is not GroupedExperts or experts.impl != "invariant" or self.shared is not None:
            return False
        return not torch.is_grad_enabled() and batch_invariant.uses_triton(x_TD)

    def _fused(self, x_TD: torch.Tensor) -> str | None:
        """The `fused_moe` path ("small" or "tiled") for decode-sized inference batches on CUDA; None for the
        grouped GEMMs (also in deterministic mode, with another expert kernel forced, or experts split across
        ranks)."""
        ordinary = type(self.experts) is GroupedExperts and self.experts.impl == "auto" and not self.router.invariant
        if not ordinary:
            return None
        return fused_moe.mode(x_TD, self.router.weight.shape[0], self.router.top_k, self.experts.w2.shape[-1])

    def _forward_fused(self, x_TD: torch.Tensor, mode: str, sum_pairs: bool) -> tuple[Routing, torch.Tensor]:
        router = self.router
        if gemv.applies(x_TD, router.weight):  # a few tokens: the router's GEMV spread over the GPU, then top-k
            logits_TE = gemv.gemv(x_TD, router.weight)
            weights_TK, ids_TK = fused_moe.route_logits(
                logits_TE, router.expert_bias, router.top_k, router.norm_topk_prob
            )
        else:
            weights_TK, ids_TK, logits_TE = fused_moe.route(
                x_TD, router.weight, router.expert_bias, router.top_k, router.norm_topk_prob
            )
        w13, w2 = self.experts.w13, self.experts.w2  # the weights come in x's dtype (rounded in the route kernel)
        if mode == "small":
            out_TD = fused_moe.experts(x_TD, weights_TK, ids_TK, w13, w2)
        else:
            out_TD = fused_moe.pairs_tiled(x_TD, weights_TK, ids_TK, w13, w2)
            if sum_pairs or self.shared is not None:
                out_TD = out_TD.sum(1).to(x_TD.dtype)
        return Routing(weights_TK, ids_TK, logits_TE), out_TD
