"""Advantage estimators: one scalar reward per sample in, one scalar advantage per sample out.

Sits between rewards and the trainer: after a step's rollouts are scored, `compute_advantages(rewards_N,
group_ids_N, cfg)` turns the rewards into advantages, which the trainer broadcasts to each sample's
response tokens (`LossInputs.advantages_T`). Each estimator is a small pure function in
`ADVANTAGE_ESTIMATORS`:

    grpo                   (r - group mean) / (group std + eps)     Shao et al. 2024 (DeepSeekMath)
    drgrpo                 r - group mean                            Liu et al. 2025 (Dr.GRPO)
    rloo                   r - mean of the other n-1 of the group    Ahmadian et al. 2024
    reinforce_pp           (r - batch mean) / (batch std + eps)      Hu 2025 (REINFORCE++)
    reinforce_pp_baseline  group-centred, then batch-whitened        Hu 2025 (REINFORCE++ w/ baseline)

Decisions:
- A group is the n samples of one prompt; group ids run 0..G-1 and groups may differ in size (filtered or
  failed samples). Group statistics are vectorised with `index_add`, no per-group Python loop.
- A group of size 1 has no baseline to compare with: group-based estimators give it advantage 0 (it
  carries no learning signal), and `reinforce_pp_baseline` leaves such samples out of the batch statistics.
- Standard deviations are the unbiased sample std (n - 1), as TRL and verl use. A zero-variance group
  (all rewards equal, found exactly by group min == max) gets advantage exactly 0 from every group-based
  estimator, not float round-off of the mean divided by eps.
- `std_normalize` applies to grpo and the two REINFORCE++ variants (batch whitening without it is batch
  centring); drgrpo and rloo never divide by a std, that being their point (Dr.GRPO removes the std bias).
- Batch statistics (REINFORCE++) are over the rewards passed in: pass the whole global batch, gathered
  across ranks, to whiten over the global batch. Group statistics need no traffic (a group stays on one rank).
- Seam for PPO with a critic: GAE (Schulman et al. 2016) needs per-token rewards, values and masks and
  returns per-token advantages and returns, so it will be a separate registry of token-level estimators
  (`rewards_T, values_T, mask_T, seq_ids_T -> advantages_T, returns_T`), not an entry here.

Legend: N samples, G groups.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(kw_only=True, slots=True)
class AdvantageConfig:
    name: str = "grpo"
    """Key of ADVANTAGE_ESTIMATORS: grpo, drgrpo, rloo, reinforce_pp, reinforce_pp_baseline."""
    std_normalize: bool = True
    """Divide by the std (group std for grpo, batch std for reinforce_pp*); drgrpo and rloo never do."""
    eps: float = 1e-6
    """Added to the std before dividing."""
    kl_in_reward: bool = False
    """KL to the reference as reward shaping instead of a loss term: before advantages, each sample's reward
    gets -trainer.loss.kl_coef x the sum over its response tokens of the KL estimate (trainer.loss.kl_estimator)
    of the policy against the reference (needs kl_coef > 0; the loss then has no KL term)."""

    def __post_init__(self) -> None:
        _estimator(self.name)
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")


def _estimator(name: str) -> Callable[[Tensor, Tensor, AdvantageConfig], Tensor]:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r} (known: {', '.join(sorted(ADVANTAGE_ESTIMATORS))})")
    return ADVANTAGE_ESTIMATORS[name]


def compute_advantages(rewards_N: Tensor, group_ids_N: Tensor, cfg: AdvantageConfig) -> Tensor:
    """advantages_N (float32) for rewards_N grouped by group_ids_N (int, 0..G-1)."""
    if rewards_N.dim() != 1 or rewards_N.shape != group_ids_N.shape:
        raise ValueError(f"rewards and group ids must be 1-D of one length, got {rewards_N.shape}, {group_ids_N.shape}")
    if rewards_N.numel() and int(group_ids_N.min()) < 0:
        raise ValueError("group ids must be >= 0")
    return _estimator(cfg.name)(rewards_N.float(), group_ids_N.long(), cfg)


# ---------------------------------------------------------------------------------------------------
# statistics


def _group_sum(x_N: Tensor, group_ids_N: Tensor) -> Tensor:
    """x_G: per-group sums, G = max id + 1."""
    num_groups = int(group_ids_N.max()) + 1 if group_ids_N.numel() else 0
    return x_N.new_zeros(num_groups).index_add(0, group_ids_N, x_N)


def _group_extreme(x_N: Tensor, group_ids_N: Tensor, reduce: str) -> Tensor:
    """For each sample, the min or max (`reduce`: amin, amax) of x over its group."""
    num_groups = int(group_ids_N.max()) + 1 if group_ids_N.numel() else 0
    out_G = x_N.new_zeros(num_groups).scatter_reduce(0, group_ids_N, x_N, reduce, include_self=False)
    return out_G[group_ids_N]


def _group_stats(rewards_N: Tensor, group_ids_N: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each sample: its group's size, whether the group carries signal (size > 1 and not all rewards
    equal), the group mean and the unbiased group std (0 for groups of size 1)."""
    count_N = _group_sum(torch.ones_like(rewards_N), group_ids_N)[group_ids_N]
    mean_N = _group_sum(rewards_N, group_ids_N)[group_ids_N] / count_N
    sq_dev_N = _group_sum((rewards_N - mean_N).square(), group_ids_N)[group_ids_N]
    std_N = (sq_dev_N / (count_N - 1).clamp(min=1)).sqrt()
    varies_N = _group_extreme(rewards_N, group_ids_N, "amax") > _group_extreme(rewards_N, group_ids_N, "amin")
    return count_N, (count_N > 1) & varies_N, mean_N, std_N


def _whiten(x_N: Tensor, keep_N: Tensor, cfg: AdvantageConfig) -> Tensor:
    """(x - mean) / (std + eps) over the kept samples (std only if std_normalize); 0 for the others and
    when fewer than 2 samples are kept."""
    if int(keep_N.sum()) < 2:
        return torch.zeros_like(x_N)
    kept_N = x_N[keep_N]
    out_N = x_N - kept_N.mean()
    if cfg.std_normalize:
        out_N = out_N / (kept_N.std() + cfg.eps)
    return torch.where(keep_N, out_N, 0.0)


# ---------------------------------------------------------------------------------------------------
# estimators


def grpo(rewards_N: Tensor, group_ids_N: Tensor, cfg: AdvantageConfig) -> Tensor:
    """GRPO (Shao et al. 2024, arXiv:2402.03300): (r - group mean) / (group std + eps)."""
    _, signal_N, mean_N, std_N = _group_stats(rewards_N, group_ids_N)
    adv_N = rewards_N - mean_N
    if cfg.std_normalize:
        adv_N = adv_N / (std_N + cfg.eps)
    return torch.where(signal_N, adv_N, 0.0)


def drgrpo(rewards_N: Tensor, group_ids_N: Tensor, cfg: AdvantageConfig) -> Tensor:
    """Dr.GRPO (Liu et al. 2025, arXiv:2503.20783): r - group mean, no std division."""
    _, signal_N, mean_N, _ = _group_stats(rewards_N, group_ids_N)
    return torch.where(signal_N, rewards_N - mean_N, 0.0)


def rloo(rewards_N: Tensor, group_ids_N: Tensor, cfg: AdvantageConfig) -> Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740): r_i - (sum_group - r_i) / (n - 1), the mean of the
    other n - 1 samples; equal to n / (n - 1) * (r_i - group mean)."""
    count_N, signal_N, mean_N, _ = _group_stats(rewards_N, group_ids_N)
    others_mean_N = (mean_N * count_N - rewards_N) / (count_N - 1).clamp(min=1)
    return torch.where(signal_N, rewards_N - others_mean_N, 0.0)


def reinforce_pp(rewards_N: Tensor, group_ids_N: Tensor, cfg: AdvantageConfig) -> Tensor:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): whiten the rewards over the whole batch; groups unused."""
    return _whiten(rewards_N, torch.ones_like(rewards_N, dtype=torch.bool), cfg)


def reinforce_pp_baseline(rewards_N: Tensor, group_ids_N: Tensor, cfg: AdvantageConfig) -> Tensor:
    """REINFORCE++ with baseline (Hu 2025): subtract the group mean, then whiten over the batch (groups of
    size 1 stay 0 and are left out of the batch statistics)."""
    count_N, signal_N, mean_N, _ = _group_stats(rewards_N, group_ids_N)
    centred_N = torch.where(signal_N, rewards_N - mean_N, 0.0)
    return _whiten(centred_N, count_N > 1, cfg)


ADVANTAGE_ESTIMATORS: dict[str, Callable[[Tensor, Tensor, AdvantageConfig], Tensor]] = {
    "grpo": grpo,
    "drgrpo": drgrpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp,
    "reinforce_pp_baseline": reinforce_pp_baseline,
}
