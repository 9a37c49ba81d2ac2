"""Policy-gradient losses: per-token policy losses, off-policy corrections, KL and entropy terms, aggregation.

Sits in the trainer's inner loop: for each micro-batch of packed tokens the trainer computes the current
logprobs (with grad), builds `LossInputs`, calls `policy_loss(inputs, cfg, norm)` and backpropagates the
scalar. Every variant lives in a registry of small pure functions:

    POLICY_LOSSES           ppo, gspo, cispo, reinforce              (LossInputs, LossConfig) -> (loss_T, metrics)
    OFF_POLICY_CORRECTIONS  none, token_tis, token_mis, seq_tis, seq_mis  -> (weight_T, keep_T, metrics)
    KL_ESTIMATORS           k1, k2, k3, low_var_kl                   (logp_T, ref_logp_T) -> kl_T
    AGGREGATIONS            token_mean, seq_mean_token_mean, seq_mean_token_sum, constant  -> scalar

Decisions:
- Composition (`policy_loss`): off-policy weight and keep mask (trainer `old` vs engine `rollout` logprobs)
  -> per-token policy loss x weight -> + kl_coef * KL(current || ref) - entropy_coef * entropy -> tokens
  dropped by the correction zeroed (all terms) -> aggregation. The off-policy weight multiplies the policy
  term only; KL and entropy are regularisers, not estimates under the sampling policy.
- Aggregations divide by GLOBAL counts (`Normalizer`: the whole global batch, all micro-batches and ranks),
  so each micro-batch's scalar is its share of the global loss and summing (accumulating gradients) over
  micro-batches and ranks gives the same loss and gradient however the batch is split. Tokens dropped by
  an off-policy mask still count in the normaliser (dropping a token zeroes its term; it does not rescale
  the others). With FSDP's mean-reduction of gradients over ranks, the trainer multiplies by the world size.
- Masked-out tokens are excluded with `torch.where`, and the log-ratio is zeroed on them and clamped to
  [-20, 20] before `exp`, so garbage logprobs on prompt or padding tokens cannot produce inf/NaN values or
  gradients. A ratio beyond e^20 is clipped by every clipped loss anyway.
- Metrics are detached 0-dim tensors (no host sync), each a mean over the micro-batch's mask tokens
  (the trainer averages them across micro-batches weighted by mask tokens), except keys ending in `_max`,
  which are maxima (reduce with max). Sequence-level quantities (GSPO clipping, sequence-level corrections)
  are reported per token too, i.e. token-weighted.
- GSPO uses the GSPO-token form, ratio s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)]: its value is the
  sequence ratio s_i and its gradient equals sequence-level GSPO's when advantages are constant along a
  sequence, while also allowing per-token advantages. GSPO wants much smaller eps (paper: 3e-4 / 4e-4).
- Sequence-level off-policy weights use the PRODUCT of token ratios, rho(y) = exp(sum_t (old - rollout)):
  the unbiased sequence importance weight analysed by Yao et al. / the Qwen team (Seq-TIS, Seq-MIS). Its
  spread grows with length, so the bounds are absolute; a length-normalised geometric variant would be a
  new registry entry.
- MIS keeps the importance weight inside [mis_lower, mis_upper] and drops the token (or sequence) outside
  it, as IcePop's M(k) = k * 1[alpha <= k <= beta] and Seq-MIS rho(y) * 1[...]: masking replaces TIS's
  truncation; it does not also throw the weight away.
- Unknown registry keys raise ValueError naming the key and the known ones, at config time
  (`LossConfig.__post_init__`) and at lookup. A knob that needs an input the batch lacks (kl_coef > 0 without
  ref logprobs, entropy_coef != 0 without entropy, a correction without rollout logprobs) is a ValueError,
  never silently skipped.

Legend: T tokens of the micro-batch (packed, flat), S sequences of the micro-batch.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Metrics = dict[str, Tensor]
_LOG_RATIO_CLAMP = 20.0
_LOW_VAR_KL_CLAMP = 10.0


@dataclass(kw_only=True, slots=True)
class LossInputs:
    """One micro-batch, flat over its packed tokens. Sequences are never split across micro-batches."""

    logprobs_T: Tensor
    """Current policy logprobs of the sampled tokens (requires grad)."""
    old_logprobs_T: Tensor
    """Logprobs the ratio is taken against: the trainer's policy before this update (no grad)."""
    advantages_T: Tensor
    mask_T: Tensor
    """Float 0/1: tokens that carry loss (response tokens)."""
    seq_ids_T: Tensor
    """int64 index of each token's sequence, 0..num_seqs-1."""
    num_seqs: int
    rollout_logprobs_T: Tensor | None = None
    """What the inference engine reported: for off-policy correction and mismatch metrics."""
    ref_logprobs_T: Tensor | None = None
    """Frozen reference policy, for the KL term."""
    entropy_T: Tensor | None = None
    """Current policy entropy per token (with grad), for the entropy bonus."""


@dataclass(kw_only=True, slots=True)
class Normalizer:
    """Global counts over the WHOLE global batch (all micro-batches, all ranks), computed once per step."""

    num_tokens: float
    """Total mask tokens (sum of mask_T), before any off-policy masking."""
    num_seqs: float
    """Total sequences."""
    seq_num_tokens_T: Tensor | None = None
    """For each token of THIS micro-batch, the mask tokens of its sequence (seq_mean_token_mean). None:
    computed from the micro-batch (`seq_num_tokens`), exact since sequences are never split."""
    constant: float | None = None
    """Dr.GRPO divisor: num_seqs x max_response_tokens (the generation budget), so each sequence's token
    sum is divided by the same length whatever its own length. Required by the `constant` aggregation."""

    def __post_init__(self) -> None:
        if self.num_tokens <= 0 or self.num_seqs <= 0:
            raise ValueError(f"empty global batch (num_tokens={self.num_tokens}, num_seqs={self.num_seqs})")
        if self.constant is not None and self.constant <= 0:
            raise ValueError(f"Normalizer.constant must be > 0, got {self.constant}")


@dataclass(kw_only=True, slots=True)
class LossConfig:
    policy_loss: str = "ppo"
    """Key of POLICY_LOSSES: ppo, gspo, cispo, reinforce."""
    eps_clip: float = 0.2
    """Lower clip: the ratio is clipped at 1 - eps_clip (and at 1 + eps_clip unless eps_clip_high is set)."""
    eps_clip_high: float | None = None
    """Upper clip 1 + eps_clip_high (DAPO clip-higher, e.g. 0.28); None: eps_clip."""
    eps_clip_c: float | None = None
    """Dual-clip constant c > 1: for negative advantages the loss is capped at -A * c. None: off."""
    aggregation: str = "token_mean"
    """Key of AGGREGATIONS: token_mean, seq_mean_token_mean, seq_mean_token_sum, constant (Dr.GRPO)."""
    max_response_tokens: int | None = None
    """Dr.GRPO (aggregation `constant`): the divisor is num_seqs x this token budget. None: the RL loop uses
    `rollout.max_response_len`; a Trainer built directly must be given it."""
    kl_coef: float = 0.0
    """Weight of KL(current || ref): a loss term, or with the RL loop's `advantage.kl_in_reward` a penalty on
    each sample's reward instead (`Trainer.kl_rewards`); 0: no reference and no KL."""
    kl_estimator: str = "low_var_kl"
    """Key of KL_ESTIMATORS: k1, k2, k3, low_var_kl."""
    entropy_coef: float = 0.0
    """Entropy bonus: the loss gets - entropy_coef * entropy per token."""
    off_policy: str = "none"
    """Key of OFF_POLICY_CORRECTIONS (trainer-vs-engine mismatch): none, token_tis, token_mis, seq_tis, seq_mis."""
    tis_clip: float = 2.0
    """Truncation C of TIS: weight = min(ratio, C)."""
    mis_lower: float = 0.5
    """MIS: tokens (sequences) whose ratio is below this are dropped."""
    mis_upper: float = 2.0
    """MIS: tokens (sequences) whose ratio is above this are dropped."""

    def __post_init__(self) -> None:
        for field, registry in (
            ("policy_loss", POLICY_LOSSES),
            ("aggregation", AGGREGATIONS),
            ("kl_estimator", KL_ESTIMATORS),
            ("off_policy", OFF_POLICY_CORRECTIONS),
        ):
            lookup(registry, getattr(self, field), field)
        _check(self.eps_clip > 0 and (self.eps_clip_high is None or self.eps_clip_high > 0), "eps_clip must be > 0")
        _check(self.eps_clip_c is None or self.eps_clip_c > 1, f"eps_clip_c must be > 1, got {self.eps_clip_c}")
        budget = self.max_response_tokens
        _check(budget is None or budget >= 1, f"max_response_tokens must be >= 1, got {budget}")
        _check(self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}")
        _check(self.tis_clip > 0, f"tis_clip must be > 0, got {self.tis_clip}")
        bounds = f"mis_lower={self.mis_lower}, mis_upper={self.mis_upper}"
        _check(0 <= self.mis_lower < self.mis_upper, f"need 0 <= mis_lower < mis_upper, got {bounds}")

    @property
    def clip_low(self) -> float:
        return self.eps_clip

    @property
    def clip_high(self) -> float:
        return self.eps_clip if self.eps_clip_high is None else self.eps_clip_high


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def lookup(registry: Mapping[str, Any], key: str, what: str) -> Any:
    """`registry[key]`, or a ValueError naming the key and listing the known ones."""
    if key not in registry:
        raise ValueError(f"unknown {what} {key!r} (known: {', '.join(sorted(registry))})")
    return registry[key]


# ---------------------------------------------------------------------------------------------------
# small helpers


def masked_mean(x_T: Tensor, mask_T: Tensor) -> Tensor:
    """Detached mean of x over mask tokens (0 when there are none)."""
    x_T = x_T.detach().float()
    return torch.where(mask_T > 0, x_T * mask_T, 0.0).sum() / mask_T.sum().clamp(min=1)


def masked_max(x_T: Tensor, mask_T: Tensor) -> Tensor:
    """Detached max of a non-negative x over mask tokens (0 when there are none)."""
    x_T = x_T.detach().float()
    return torch.where(mask_T > 0, x_T, float("-inf")).max().clamp(min=0) if x_T.numel() else x_T.new_zeros(())


def seq_sum(x_T: Tensor, seq_ids_T: Tensor, num_seqs: int) -> Tensor:
    """x_S: the sum of x over each sequence's tokens (differentiable)."""
    return x_T.new_zeros(num_seqs).index_add(0, seq_ids_T, x_T)


def seq_num_tokens(mask_T: Tensor, seq_ids_T: Tensor, num_seqs: int) -> Tensor:
    """For each token, the number of mask tokens of its sequence."""
    return seq_sum(mask_T.float(), seq_ids_T, num_seqs)[seq_ids_T]


def _log_ratio(logp_T: Tensor, base_T: Tensor, mask_T: Tensor) -> Tensor:
    """logp - base on mask tokens, 0 elsewhere, clamped so exp() stays finite (gradient kept)."""
    return torch.where(mask_T > 0, logp_T - base_T, 0.0).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)


def _seq_mean_log_ratio(log_ratio_T: Tensor, inputs: LossInputs) -> Tensor:
    """For each token, the mean over its sequence's mask tokens of the (masked) log-ratio."""
    total_S = seq_sum(log_ratio_T, inputs.seq_ids_T, inputs.num_seqs)
    count_S = seq_sum(inputs.mask_T.float(), inputs.seq_ids_T, inputs.num_seqs).clamp(min=1)
    return (total_S / count_S)[inputs.seq_ids_T]


# ---------------------------------------------------------------------------------------------------
# policy losses: per-token loss (aggregated later) and metrics


def _clipped_surrogate(ratio_T: Tensor, inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, Metrics]:
    """max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), then the dual-clip cap -A c for A < 0."""
    adv_T, mask_T = inputs.advantages_T, inputs.mask_T
    unclipped_T = -adv_T * ratio_T
    clipped_T = -adv_T * ratio_T.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    loss_T = torch.maximum(unclipped_T, clipped_T)
    metrics = {
        "policy/clip_frac": masked_mean(clipped_T > unclipped_T, mask_T),
        "policy/ratio_mean": masked_mean(ratio_T, mask_T),
        "policy/ratio_max": masked_max(ratio_T, mask_T),
    }
    if cfg.eps_clip_c is not None:
        cap_T = -adv_T * cfg.eps_clip_c
        capped_T = (adv_T < 0) & (loss_T > cap_T)
        loss_T = torch.where(capped_T, cap_T, loss_T)
        metrics["policy/dual_clip_frac"] = masked_mean(capped_T, mask_T)
    return loss_T, metrics


def ppo_loss(inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, Metrics]:
    """PPO-clip (Schulman et al. 2017, arXiv:1707.06347) with DAPO's asymmetric clip-higher (Yu et al.
    2025, arXiv:2503.14476) and dual-clip for negative advantages (Ye et al. 2020, arXiv:1912.09729).
    r = exp(logp - old) per token; loss_T = max(-A r, -A clip(r)), capped at -A c when A < 0."""
    ratio_T = _log_ratio(inputs.logprobs_T, inputs.old_logprobs_T, inputs.mask_T).exp()
    return _clipped_surrogate(ratio_T, inputs, cfg)


def gspo_loss(inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, Metrics]:
    """GSPO (Zheng et al. 2025, arXiv:2507.18071): the sequence ratio s_i = exp(mean over the sequence's
    mask tokens of logp - old), clipped at the sequence level, in the GSPO-token form
    s_i,t = sg[s_i] * exp(logp_t - sg[logp_t]) (same value; same gradient for constant advantages)."""
    log_ratio_T = _log_ratio(inputs.logprobs_T, inputs.old_logprobs_T, inputs.mask_T)
    seq_log_ratio_T = _seq_mean_log_ratio(log_ratio_T.detach(), inputs)
    logp_T = inputs.logprobs_T
    token_T = torch.where(inputs.mask_T > 0, logp_T - logp_T.detach(), 0.0)  # value 0, gradient d logp_t
    ratio_T = (seq_log_ratio_T + token_T).exp()
    return _clipped_surrogate(ratio_T, inputs, cfg)


def cispo_loss(inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, Metrics]:
    """CISPO (MiniMax-M1, 2025, arXiv:2506.13585): loss_T = -sg(clip(r, 1 - eps_low, 1 + eps_high)) A logp.
    The IS weight is clipped and detached, so every token keeps a gradient (through logp only). MiniMax
    clip only the top in practice: set eps_clip large (e.g. 1.0, i.e. no lower bound) to match."""
    ratio_T = _log_ratio(inputs.logprobs_T, inputs.old_logprobs_T, inputs.mask_T).exp().detach()
    weight_T = ratio_T.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    loss_T = -weight_T * inputs.advantages_T * inputs.logprobs_T
    metrics = {
        "policy/clip_frac": masked_mean(weight_T != ratio_T, inputs.mask_T),
        "policy/ratio_mean": masked_mean(ratio_T, inputs.mask_T),
        "policy/ratio_max": masked_max(ratio_T, inputs.mask_T),
    }
    return loss_T, metrics


def reinforce_loss(inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, Metrics]:
    """REINFORCE (Williams 1992): loss_T = -A logp, no ratio and no clipping (exact only on-policy)."""
    ratio_T = _log_ratio(inputs.logprobs_T, inputs.old_logprobs_T, inputs.mask_T).exp()
    return -inputs.advantages_T * inputs.logprobs_T, {"policy/ratio_mean": masked_mean(ratio_T, inputs.mask_T)}


POLICY_LOSSES: dict[str, Callable[[LossInputs, LossConfig], tuple[Tensor, Metrics]]] = {
    "ppo": ppo_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
    "reinforce": reinforce_loss,
}


# ---------------------------------------------------------------------------------------------------
# aggregation: micro-batch scalar whose sum over all micro-batches (and ranks) is the global loss


def _masked(loss_T: Tensor, inputs: LossInputs) -> Tensor:
    return torch.where(inputs.mask_T > 0, loss_T * inputs.mask_T, 0.0)


def token_mean(loss_T: Tensor, inputs: LossInputs, norm: Normalizer) -> Tensor:
    """Every token of the global batch weighs the same (DAPO): sum(mask * loss) / num_tokens."""
    return _masked(loss_T, inputs).sum() / norm.num_tokens


def seq_mean_token_mean(loss_T: Tensor, inputs: LossInputs, norm: Normalizer) -> Tensor:
    """Mean over each sequence's tokens, then over sequences (GRPO as published):
    sum(mask * loss / seq_num_tokens) / num_seqs."""
    counts_T = norm.seq_num_tokens_T
    if counts_T is None:
        counts_T = seq_num_tokens(inputs.mask_T, inputs.seq_ids_T, inputs.num_seqs)
    return (_masked(loss_T, inputs) / counts_T.clamp(min=1)).sum() / norm.num_seqs


def seq_mean_token_sum(loss_T: Tensor, inputs: LossInputs, norm: Normalizer) -> Tensor:
    """Sum over each sequence's tokens, mean over sequences: sum(mask * loss) / num_seqs."""
    return _masked(loss_T, inputs).sum() / norm.num_seqs


def constant_norm(loss_T: Tensor, inputs: LossInputs, norm: Normalizer) -> Tensor:
    """Dr.GRPO (Liu et al. 2025, arXiv:2503.20783): sum(mask * loss) / constant, with constant =
    num_seqs x max_response_tokens, so no length-dependent weighting."""
    if norm.constant is None:
        raise ValueError("aggregation 'constant' needs Normalizer.constant (num_seqs x max_response_tokens)")
    return _masked(loss_T, inputs).sum() / norm.constant


AGGREGATIONS: dict[str, Callable[[Tensor, LossInputs, Normalizer], Tensor]] = {
    "token_mean": token_mean,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum": seq_mean_token_sum,
    "constant": constant_norm,
}


# ---------------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020): samples from the policy, r = ref / policy


def kl_k1(logp_T: Tensor, ref_logp_T: Tensor) -> Tensor:
    """k1 = logp - ref: unbiased for KL(policy || ref), high variance, can be negative."""
    return logp_T - ref_logp_T


def kl_k2(logp_T: Tensor, ref_logp_T: Tensor) -> Tensor:
    """k2 = (logp - ref)^2 / 2: biased, low variance, >= 0."""
    return 0.5 * (logp_T - ref_logp_T).square()


def kl_k3(logp_T: Tensor, ref_logp_T: Tensor) -> Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1: unbiased and >= 0."""
    log_r_T = ref_logp_T - logp_T
    return log_r_T.exp() - log_r_T - 1


def kl_low_var(logp_T: Tensor, ref_logp_T: Tensor) -> Tensor:
    """k3 with the log-ratio clamped to [-20, 20] and the result to [-10, 10] (as verl's low_var_kl)."""
    log_r_T = (ref_logp_T - logp_T).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return (log_r_T.exp() - log_r_T - 1).clamp(-_LOW_VAR_KL_CLAMP, _LOW_VAR_KL_CLAMP)


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "low_var_kl": kl_low_var,
}


@torch.no_grad()
def kl_penalty_rewards(
    logprobs_T: Tensor, ref_logprobs_T: Tensor, mask_T: Tensor, *, kl_coef: float, estimator: str = "k1"
) -> Tensor:
    """KL as reward shaping: the per-token reward -kl_coef * kl (0 off the mask), detached, to add to the
    rewards/returns before advantages are computed (PPO-RLHF, Ouyang et al. 2022; REINFORCE++)."""
    kl_T = lookup(KL_ESTIMATORS, estimator, "kl_estimator")(logprobs_T, ref_logprobs_T)
    return torch.where(mask_T > 0, -kl_coef * kl_T * mask_T, 0.0)


# ---------------------------------------------------------------------------------------------------
# off-policy corrections between the trainer (old) and the engine (rollout): (weight_T, keep_T, metrics)
# Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training" (TIS);
# Ling team 2025, IcePop (token MIS); Qwen team / Yao et al. 2025 analysis of token vs sequence IS (Seq-MIS).


def _token_ratio(inputs: LossInputs) -> Tensor:
    return _log_ratio(inputs.old_logprobs_T, inputs.rollout_logprobs_T, inputs.mask_T).detach().exp()


def _seq_ratio(inputs: LossInputs) -> Tensor:
    """rho(y) = prod_t old/rollout = exp(sum_t (old - rollout)) over the sequence's mask tokens, per token."""
    log_ratio_T = _log_ratio(inputs.old_logprobs_T, inputs.rollout_logprobs_T, inputs.mask_T).detach()
    total_T = seq_sum(log_ratio_T, inputs.seq_ids_T, inputs.num_seqs)[inputs.seq_ids_T]
    return total_T.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP).exp()


def _truncate(ratio_T: Tensor, inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, Tensor, Metrics]:
    weight_T = ratio_T.clamp(max=cfg.tis_clip)
    metrics = {
        "off_policy/weight_mean": masked_mean(weight_T, inputs.mask_T),
        "off_policy/truncated_frac": masked_mean(ratio_T > cfg.tis_clip, inputs.mask_T),
    }
    return weight_T, inputs.mask_T > 0, metrics


def _mask(ratio_T: Tensor, inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, Tensor, Metrics]:
    inside_T = (ratio_T >= cfg.mis_lower) & (ratio_T <= cfg.mis_upper)
    weight_T = torch.where(inside_T, ratio_T, 0.0)
    metrics = {
        "off_policy/weight_mean": masked_mean(weight_T, inputs.mask_T),
        "off_policy/masked_frac": masked_mean(~inside_T, inputs.mask_T),
    }
    return weight_T, (inputs.mask_T > 0) & inside_T, metrics


def no_correction(inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, Tensor, Metrics]:
    return torch.ones_like(inputs.mask_T), inputs.mask_T > 0, {}


def token_tis(inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, Tensor, Metrics]:
    """Token TIS (Yao et al. 2025): w_t = min(exp(old - rollout), C), no grad."""
    return _truncate(_token_ratio(inputs), inputs, cfg)


def token_mis(inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, Tensor, Metrics]:
    """Token MIS (IcePop): w_t = r_t if mis_lower <= r_t <= mis_upper, else the token is dropped."""
    return _mask(_token_ratio(inputs), inputs, cfg)


def seq_tis(inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, Tensor, Metrics]:
    """Sequence TIS: w = min(rho(y), C) on every token of the sequence."""
    return _truncate(_seq_ratio(inputs), inputs, cfg)


def seq_mis(inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor, Tensor, Metrics]:
    """Sequence MIS: w = rho(y) if mis_lower <= rho(y) <= mis_upper, else the whole sequence is dropped."""
    return _mask(_seq_ratio(inputs), inputs, cfg)


OFF_POLICY_CORRECTIONS: dict[str, Callable[[LossInputs, LossConfig], tuple[Tensor, Tensor, Metrics]]] = {
    "none": no_correction,
    "token_tis": token_tis,
    "token_mis": token_mis,
    "seq_tis": seq_tis,
    "seq_mis": seq_mis,
}


def mismatch_metrics(inputs: LossInputs) -> Metrics:
    """Trainer (old) vs engine (rollout) logprobs over mask tokens: mean and max |old - rollout|, and the
    k3 estimate of KL(rollout || old) (samples come from the rollout policy, r = old / rollout)."""
    assert inputs.rollout_logprobs_T is not None
    diff_T = (inputs.old_logprobs_T - inputs.rollout_logprobs_T).detach()
    diff_T = torch.where(inputs.mask_T > 0, diff_T, 0.0)
    return {
        "mismatch/abs_diff_mean": masked_mean(diff_T.abs(), inputs.mask_T),
        "mismatch/abs_diff_max": masked_max(diff_T.abs(), inputs.mask_T),
        "mismatch/kl_k3": masked_mean(kl_k3(inputs.rollout_logprobs_T, inputs.old_logprobs_T), inputs.mask_T),
    }


# ---------------------------------------------------------------------------------------------------
# the composition


def _check_inputs(inputs: LossInputs, cfg: LossConfig) -> None:
    if cfg.kl_coef > 0 and inputs.ref_logprobs_T is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs_T")
    if cfg.entropy_coef != 0 and inputs.entropy_T is None:
        raise ValueError("entropy_coef != 0 needs entropy_T")
    if cfg.off_policy != "none" and inputs.rollout_logprobs_T is None:
        raise ValueError(f"off_policy {cfg.off_policy!r} needs rollout_logprobs_T")


def _regularisers(inputs: LossInputs, cfg: LossConfig) -> tuple[Tensor | float, Metrics]:
    """kl_coef * KL(current || ref) - entropy_coef * entropy, per token (0 when both are off)."""
    extra_T: Tensor | float = 0.0
    metrics: Metrics = {}
    if cfg.kl_coef > 0:
        # off the mask, compare ref with itself: garbage logprobs there cannot reach exp() in k3
        ref_T = inputs.ref_logprobs_T
        logp_T = torch.where(inputs.mask_T > 0, inputs.logprobs_T, ref_T)
        kl_T = lookup(KL_ESTIMATORS, cfg.kl_estimator, "kl_estimator")(logp_T, ref_T)
        extra_T = extra_T + cfg.kl_coef * kl_T
        metrics["kl/mean"] = masked_mean(kl_T, inputs.mask_T)
    if cfg.entropy_coef != 0:
        extra_T = extra_T - cfg.entropy_coef * inputs.entropy_T
    if inputs.entropy_T is not None:  # a metric whenever the trainer computed it, a bonus only with a coefficient
        metrics["entropy/mean"] = masked_mean(inputs.entropy_T.detach(), inputs.mask_T)
    return extra_T, metrics


def policy_loss(inputs: LossInputs, cfg: LossConfig, norm: Normalizer) -> tuple[Tensor, Metrics]:
    """This micro-batch's share of the global loss (sum it over micro-batches and ranks), and its metrics.

    off-policy weight -> policy loss per token x weight -> + kl_coef KL - entropy_coef entropy -> drop the
    tokens the correction masked -> aggregate with the global normaliser."""
    _check_inputs(inputs, cfg)
    metrics: Metrics = {}
    if inputs.rollout_logprobs_T is not None:
        metrics.update(mismatch_metrics(inputs))
    correction = lookup(OFF_POLICY_CORRECTIONS, cfg.off_policy, "off_policy")
    weight_T, keep_T, correction_metrics = correction(inputs, cfg)
    pg_T, pg_metrics = lookup(POLICY_LOSSES, cfg.policy_loss, "policy_loss")(inputs, cfg)
    extra_T, extra_metrics = _regularisers(inputs, cfg)
    loss_T = torch.where(keep_T, pg_T * weight_T + extra_T, 0.0)
    loss = lookup(AGGREGATIONS, cfg.aggregation, "aggregation")(loss_T, inputs, norm)
    metrics.update(correction_metrics)
    metrics.update(pg_metrics)
    metrics.update(extra_metrics)
    metrics["policy/pg_loss"] = masked_mean(pg_T * weight_T, keep_T.float())
    return loss, metrics
