"""MoE-specific training: rollout routing replay (R3), the router-agreement metric, expert load balance
(auxiliary loss, router z-loss) and per-layer expert load metrics.

Where it sits: the trainer's forward. With `routing_replay="rollout"` every micro-batch replays the experts
the engine chose for each token (recorded during rollout and carried on the samples), so the policy being
optimised routes exactly as the one that sampled. Otherwise the trainer routes by itself and, when the
samples carry rollout routes, measures how often the two disagree (`moe/route_mismatch_frac`).

Decisions:
- A run that asks for replay and meets a sample without routes, or with routes of the wrong shape, raises
  naming the sample: silently falling back to the trainer's own routing would hide the very mismatch R3
  exists to remove.
- Disagreement compares expert SETS per (token, layer): top-k order is irrelevant to the output.
- Balance terms are per MoE layer, averaged over layers, and weighted per micro-batch by its share of the
  global batch's loss tokens, like the policy loss: the sum over micro-batches and ranks does not depend on
  how the batch was split (up to the per-micro-batch statistics the Switch loss is defined on).
- Load metrics count the routed (token, expert) slots of the step per layer: the max/mean ratio (1 is
  perfect balance), the entropy of the load distribution over experts normalised by log E (1 is uniform),
  and the number of experts that got no token.

Legend: T tokens, L MoE layers, K top-k, E experts.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch

ROUTING_REPLAY = ("none", "rollout", "train")


@dataclass(kw_only=True, slots=True)
class MoEConfig:
    routing_replay: Literal["none", "rollout", "train"] = "none"
    """none: the trainer routes by itself; rollout: replay the engine's routes (R3) in every training forward
    (samples must carry them: the loop then asks the engine to record them); train: route each micro-batch
    once in a no-grad pass and replay those routes in the gradient pass, so the forward, its
    activation-checkpointing recompute and the logprobs all use one routing."""

    aux_loss_coef: float = 0.0
    """Weight of the Switch/GShard load-balancing loss E * sum_e f_e * P_e (Fedus et al. 2021), per layer."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss mean(logsumexp(logits)^2) (ST-MoE, Zoph et al. 2022), per layer."""
    bias_update_rate: float = 0.0
    """Auxiliary-loss-free balancing (DeepSeek-V3): after each step every expert's routing bias moves by this
    much toward balance, b_e += rate * sign(mean load - load_e); 0: off."""

    def __post_init__(self) -> None:
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0 or self.bias_update_rate < 0:
            raise ValueError("moe.aux_loss_coef, moe.z_loss_coef and moe.bias_update_rate must be >= 0")
        if self.routing_replay not in ROUTING_REPLAY:
            raise ValueError(
                f"moe.routing_replay: expected one of {', '.join(ROUTING_REPLAY)}, got {self.routing_replay!r}"
            )


def route_mismatch_frac(trainer_TLK: torch.Tensor, rollout_TLK: torch.Tensor) -> torch.Tensor:
    """Fraction of (token, layer) pairs whose expert sets differ between the trainer and the rollout."""
    mine = trainer_TLK.long().sort(dim=-1).values
    theirs = rollout_TLK.to(mine.device).long().sort(dim=-1).values
    return (mine != theirs).any(dim=-1).float().mean()


def load_balance_loss(logits_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch/GShard auxiliary loss E * sum_e f_e * P_e: f_e is the share of the T*K routed slots sent to
    expert e (no gradient), P_e the mean router probability of e. Equals 1 under perfect balance."""
    num_experts = logits_TE.shape[-1]
    probs_E = torch.softmax(logits_TE.float(), dim=-1).mean(dim=0)
    share_E = _count(ids_TK.flatten().long(), num_experts).float() / max(ids_TK.numel(), 1)
    return num_experts * (share_E * probs_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(router logits)^2: keeps router logits small (ST-MoE)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def expert_counts(ids_TLK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[L, E] routed slots per expert and layer."""
    offsets_L = torch.arange(ids_TLK.shape[1], device=ids_TLK.device)[:, None] * num_experts
    flat = (ids_TLK.long().transpose(0, 1).flatten(1) + offsets_L).flatten()
    return _count(flat, ids_TLK.shape[1] * num_experts).view(-1, num_experts)


def _count(ids_N: torch.Tensor, size: int) -> torch.Tensor:
    """bincount without its host sync on CUDA (it reads the max back): an index_add of ones."""
    return torch.zeros(size, dtype=torch.long, device=ids_N.device).index_add_(0, ids_N, torch.ones_like(ids_N))


def moe_terms(
    out, mask_T: torch.Tensor, replay_TLK: torch.Tensor | None, num_tokens: float, cfg: MoEConfig, num_experts: int
) -> tuple[torch.Tensor | float, dict, torch.Tensor | None]:
    """Of one micro-batch's forward output `out` (routes and router logits captured): its share of the balance
    losses (weighted by its loss tokens over the global batch's `num_tokens`), the route disagreement with the
    rollout's `replay_TLK`, and its [L, E] load counts (None for a dense model)."""
    routes_TLK = out.routed_experts_TLK
    if routes_TLK is None:  # a dense model
        return 0.0, {}, None
    metrics = {}
    if replay_TLK is not None:  # zero under replay, by construction
        metrics["moe/route_mismatch_frac"] = route_mismatch_frac(routes_TLK, replay_TLK)
    # a padding pass (no loss tokens) counts nothing; multiplied, not branched on, to keep the host out
    counts = expert_counts(routes_TLK, num_experts) * mask_T.any()
    if not out.router_logits:
        return 0.0, metrics, counts
    share = mask_T.sum() / num_tokens  # this micro-batch's part of the global batch
    aux = torch.stack([load_balance_loss(lg, routes_TLK[:, i]) for i, lg in enumerate(out.router_logits)]).mean()
    z = torch.stack([router_z_loss(lg) for lg in out.router_logits]).mean()
    metrics |= {"moe/aux_loss": aux.detach(), "moe/z_loss": z.detach()}
    return share * (cfg.aux_loss_coef * aux + cfg.z_loss_coef * z), metrics, counts


def load_metrics(counts_LE: torch.Tensor) -> dict[str, float]:
    """Per-layer load balance of a step's routed slots: `moe/load_max_over_mean/layer{i}`, their means over
    layers, the normalised load entropy and the count of experts with no token."""
    counts = counts_LE.double()
    num_experts = counts.shape[1]
    mean_L = counts.mean(dim=1).clamp(min=1e-12)
    ratio_L = counts.max(dim=1).values / mean_L
    share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1e-12)
    entropy_L = -(share * share.clamp(min=1e-30).log()).sum(dim=1) / math.log(num_experts)
    empty_L = (counts == 0).sum(dim=1).double()
    out = {f"moe/load_max_over_mean/layer{i}": float(r) for i, r in enumerate(ratio_L)}
    out |= {
        "moe/load_max_over_mean": float(ratio_L.mean()),
        "moe/load_entropy": float(entropy_L.mean()),
        "moe/experts_without_tokens": float(empty_L.mean()),
    }
    return out


def update_expert_bias(bias_LE: list[torch.Tensor], counts_LE: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free update, in place: overloaded experts' biases fall, underloaded rise."""
    for bias_E, counts_E in zip(bias_LE, counts_LE.to(torch.float32), strict=True):
        bias_E += rate * torch.sign(counts_E.mean() - counts_E).to(bias_E.device)
