"""Advantage estimators: rewards (and, for PPO with a critic, the critic's values) in, advantages out.

Sits between rewards and the trainer: after a step's rollouts are scored, `compute_advantages(inputs, cfg)`
turns them into advantages. An outcome estimator gives one advantage per sample, which the trainer broadcasts
to the sample's response tokens; a token-level one (gae) gives one per response token, and the critic's
regression targets (returns) with them. Each estimator is a small pure function in `ADVANTAGE_ESTIMATORS`:

    grpo                   (r - group mean) / (group std + eps)     Shao et al. 2024 (DeepSeekMath)
    drgrpo                 r - group mean                            Liu et al. 2025 (Dr.GRPO)
    rloo                   r - mean of the other n-1 of the group    Ahmadian et al. 2024
    reinforce_pp           (r - batch mean) / (batch std + eps)      Hu 2025 (REINFORCE++)
    reinforce_pp_baseline  group-centred, then batch-whitened        Hu 2025 (REINFORCE++ w/ baseline)
    gae                    per token, from the critic's values       Schulman et al. 2016 (GAE), for PPO
    distill                0: no task reward (on-policy distillation's per-token term is the whole signal)

Decisions:
- A group is the n samples of one prompt; group ids run 0..G-1 and groups may differ in size (filtered or
  failed samples). Group statistics are vectorised with `index_add`, no per-group Python loop.
- A group of size 1 has no baseline to compare with: group-based estimators give it advantage 0 (it
  carries no learning signal), and `reinforce_pp_baseline` leaves such samples out of the batch statistics.
- Standard deviations are the unbiased sample std (n - 1), as TRL and verl use. A zero-variance group
  (all rewards equal, found exactly by group min == max) gets advantage exactly 0 from every group-based
  estimator, not float round-off of the mean divided by eps.
- `std_normalize` applies to grpo, the two REINFORCE++ variants (batch whitening without it is batch
  centring) and gae (its per-token advantages whitened over every loss token of the batch); drgrpo and rloo
  never divide by a std, that being their point (Dr.GRPO removes the std bias).
- Batch statistics (REINFORCE++, gae's whitening) are over the inputs passed in: pass the whole global
  batch, gathered across ranks, to whiten over the global batch. Group statistics need no traffic (a group
  stays on one rank).
- GAE runs over a sample's loss tokens (mask 1: what the policy sampled). The sample's reward is the reward
  of its last loss token; a token's successor is the next loss token (tool outputs and other context in
  between are part of the environment's transition), so a multi-turn sample is one episode. After the last
  token the episode has ended (value 0) unless `last_values_N` gives the value to bootstrap from (an episode
  cut off rather than ended). The returns are advantages + values, taken before whitening.
- `distill` is the estimator of a run that learns from a teacher alone (`leagues.train.distill`): the task's
  advantage is 0 and the loop adds the per-token distillation term, as it does to any other estimator's.
- Registry entries take `AdvantageInputs` and return the raw advantages: [N] for outcome estimators, [N, R]
  for token-level ones; `compute_advantages` adds the returns and gae's whitening.

Legend: N samples, G groups, R response tokens (padded to the longest).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(kw_only=True, slots=True)
class AdvantageConfig:
    estimator: str = "grpo"
    """Key of ADVANTAGE_ESTIMATORS: grpo, drgrpo, rloo, reinforce_pp, reinforce_pp_baseline, gae (PPO with a
    learned critic, `critic.*`), or distill (no task reward: on-policy distillation from `distill.teacher` alone)."""
    std_normalize: bool = True
    """Divide by the std (group std for grpo, batch std for reinforce_pp*, batch whitening of gae's per-token
    advantages); drgrpo and rloo never do."""
    eps: float = 1e-6
    """Added to the std before dividing."""
    gamma: float = 1.0
    """gae: discount from one response token to the next."""
    lam: float = 0.95
    """gae: lambda, between one-step TD (0: r + gamma V' - V, low variance, biased by the critic) and Monte-Carlo
    returns minus values (1: unbiased, high variance)."""
    kl_in_reward: bool = False
    """KL to the reference as reward shaping instead of a loss term: before advantages, each sample's reward
    gets -trainer.loss.kl_coef x the sum over its response tokens of the KL estimate (trainer.loss.kl_estimator)
    of the policy against the reference (needs kl_coef > 0; the loss then has no KL term)."""

    def __post_init__(self) -> None:
        _estimator(self.estimator)
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"advantage.{name}: must be in [0, 1], got {getattr(self, name)}")

    @property
    def needs_critic(self) -> bool:
        """Whether the estimator learns from a critic's values (the run then trains one)."""
        return self.estimator in TOKEN_LEVEL


@dataclass(kw_only=True, slots=True)
class AdvantageInputs:
    """A batch of N samples as the estimators see it."""

    rewards_N: Tensor
    group_ids_N: Tensor
    """int, 0..G-1: the prompt group of each sample."""
    values_NR: Tensor | None = None
    """Token-level estimators: the critic's value of the state before each response token (0 on padding)."""
    mask_NR: Tensor | None = None
    """Token-level estimators: 1 on the response tokens the policy sampled (the loss mask), 0 elsewhere."""
    last_values_N: Tensor | None = None
    """gae: the value of the state after each sample's last token, for episodes cut off rather than ended (0 for
    those that ended); None: every episode ended."""


def _estimator(name: str) -> Callable[[AdvantageInputs, AdvantageConfig], Tensor]:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r} (known: {', '.join(sorted(ADVANTAGE_ESTIMATORS))})")
    return ADVANTAGE_ESTIMATORS[name]


def compute_advantages(inputs: AdvantageInputs, cfg: AdvantageConfig) -> tuple[Tensor, Tensor | None]:
    """(advantages, returns), float32: advantages_N of an outcome estimator and no returns, or a token-level
    estimator's advantages_NR and the critic's targets returns_NR (advantages before whitening + values)."""
    rewards_N, group_ids_N = inputs.rewards_N, inputs.group_ids_N
    if rewards_N.dim() != 1 or rewards_N.shape != group_ids_N.shape:
        raise ValueError(f"rewards and group ids must be 1-D of one length, got {rewards_N.shape}, {group_ids_N.shape}")
    if rewards_N.numel() and int(group_ids_N.min()) < 0:
        raise ValueError("group ids must be >= 0")
    as_float = lambda t: None if t is None else t.float()  # noqa: E731
    inputs = AdvantageInputs(
        rewards_N=rewards_N.float(),
        group_ids_N=group_ids_N.long(),
        values_NR=as_float(inputs.values_NR),
        mask_NR=as_float(inputs.mask_NR),
        last_values_N=as_float(inputs.last_values_N),
    )
    if not cfg.needs_critic:
        return _estimator(cfg.estimator)(inputs, cfg), None
    _check_token_inputs(inputs)
    advantages_NR = _estimator(cfg.estimator)(inputs, cfg)
    returns_NR = (advantages_NR + inputs.values_NR) * inputs.mask_NR
    if cfg.std_normalize:
        keep_NR = inputs.mask_NR > 0
        advantages_NR = _whiten(advantages_NR.flatten(), keep_NR.flatten(), cfg).view_as(advantages_NR)
    return advantages_NR, returns_NR


def _check_token_inputs(inputs: AdvantageInputs) -> None:
    num = inputs.rewards_N.shape[0]
    values_NR, mask_NR = inputs.values_NR, inputs.mask_NR
    if values_NR is None or mask_NR is None:
        raise ValueError("a token-level estimator (gae) needs the critic's values and the loss mask")
    if values_NR.dim() != 2 or values_NR.shape != mask_NR.shape or values_NR.shape[0] != num:
        raise ValueError(f"values and mask must be [N, R] for N = {num}, got {values_NR.shape}, {mask_NR.shape}")
    if inputs.last_values_N is not None and inputs.last_values_N.shape != (num,):
        raise ValueError(f"last_values must be [N] for N = {num}, got {tuple(inputs.last_values_N.shape)}")


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


def grpo(inputs: AdvantageInputs, cfg: AdvantageConfig) -> Tensor:
    """GRPO (Shao et al. 2024, arXiv:2402.03300): (r - group mean) / (group std + eps)."""
    _, signal_N, mean_N, std_N = _group_stats(inputs.rewards_N, inputs.group_ids_N)
    adv_N = inputs.rewards_N - mean_N
    if cfg.std_normalize:
        adv_N = adv_N / (std_N + cfg.eps)
    return torch.where(signal_N, adv_N, 0.0)


def drgrpo(inputs: AdvantageInputs, cfg: AdvantageConfig) -> Tensor:
    """Dr.GRPO (Liu et al. 2025, arXiv:2503.20783): r - group mean, no std division."""
    _, signal_N, mean_N, _ = _group_stats(inputs.rewards_N, inputs.group_ids_N)
    return torch.where(signal_N, inputs.rewards_N - mean_N, 0.0)


def rloo(inputs: AdvantageInputs, cfg: AdvantageConfig) -> Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740): r_i - (sum_group - r_i) / (n - 1), the mean of the
    other n - 1 samples; equal to n / (n - 1) * (r_i - group mean)."""
    rewards_N = inputs.rewards_N
    count_N, signal_N, mean_N, _ = _group_stats(rewards_N, inputs.group_ids_N)
    others_mean_N = (mean_N * count_N - rewards_N) / (count_N - 1).clamp(min=1)
    return torch.where(signal_N, rewards_N - others_mean_N, 0.0)


def reinforce_pp(inputs: AdvantageInputs, cfg: AdvantageConfig) -> Tensor:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): whiten the rewards over the whole batch; groups unused."""
    return _whiten(inputs.rewards_N, torch.ones_like(inputs.rewards_N, dtype=torch.bool), cfg)


def reinforce_pp_baseline(inputs: AdvantageInputs, cfg: AdvantageConfig) -> Tensor:
    """REINFORCE++ with baseline (Hu 2025): subtract the group mean, then whiten over the batch (groups of
    size 1 stay 0 and are left out of the batch statistics)."""
    count_N, signal_N, mean_N, _ = _group_stats(inputs.rewards_N, inputs.group_ids_N)
    centred_N = torch.where(signal_N, inputs.rewards_N - mean_N, 0.0)
    return _whiten(centred_N, count_N > 1, cfg)


def gae(inputs: AdvantageInputs, cfg: AdvantageConfig) -> Tensor:
    """GAE (Schulman et al. 2016, arXiv:1506.02438), per loss token: A_t = delta_t + gamma lam A_t', with
    delta_t = r_t + gamma V_t' - V_t, t' the next loss token, r the sample's reward on its last loss token and 0
    before it, and V and A after the last token 0 (or V = last_values_N, for an episode cut off). lam 1 gives
    the Monte-Carlo return minus V_t, lam 0 the one-step TD error. Raw: not whitened, 0 off the mask."""
    values_NR, mask_NR = inputs.values_NR, inputs.mask_NR
    num, length = values_NR.shape
    on_NR = mask_NR > 0
    last_N = torch.where(on_NR, torch.arange(length), -1).amax(dim=1) if length else torch.full((num,), -1)
    rewards_NR = torch.zeros_like(values_NR)
    ended_N = last_N >= 0
    rewards_NR[ended_N.nonzero().flatten(), last_N[ended_N]] = inputs.rewards_N[ended_N]
    next_value_N = torch.zeros(num) if inputs.last_values_N is None else inputs.last_values_N
    running_N = torch.zeros(num)
    advantages_NR = torch.zeros_like(values_NR)
    for t in reversed(range(length)):  # one step over every sample at once; skipped tokens carry the state
        delta_N = rewards_NR[:, t] + cfg.gamma * next_value_N - values_NR[:, t]
        step_N = delta_N + cfg.gamma * cfg.lam * running_N
        advantages_NR[:, t] = torch.where(on_NR[:, t], step_N, 0.0)
        running_N = torch.where(on_NR[:, t], step_N, running_N)
        next_value_N = torch.where(on_NR[:, t], values_NR[:, t], next_value_N)
    return advantages_NR


def distill(inputs: AdvantageInputs, cfg: AdvantageConfig) -> Tensor:
    """No task reward: advantage 0 for every sample; on-policy distillation's per-token term (added by the loop,
    `leagues.train.distill`) is the whole signal. The rewards are still scored and logged."""
    return torch.zeros_like(inputs.rewards_N)


ADVANTAGE_ESTIMATORS: dict[str, Callable[[AdvantageInputs, AdvantageConfig], Tensor]] = {
    "grpo": grpo,
    "drgrpo": drgrpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp,
    "reinforce_pp_baseline": reinforce_pp_baseline,
    "gae": gae,
    "distill": distill,
}
TOKEN_LEVEL = frozenset({"gae"})
"""Estimators that give per-token advantages from a critic's values."""
