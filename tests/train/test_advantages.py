"""Hand-computed advantages for every estimator in `leagues.train.advantages`, with unequal group sizes,
zero-variance groups and singleton groups.

Legend: N samples.
"""

import math

import pytest
import torch

from leagues.train.advantages import (
    ADVANTAGE_ESTIMATORS,
    TOKEN_LEVEL,
    AdvantageConfig,
    AdvantageInputs,
    compute_advantages,
)

OUTCOME = sorted(ADVANTAGE_ESTIMATORS.keys() - TOKEN_LEVEL)


def advantages(name: str, rewards, group_ids, **kwargs) -> torch.Tensor:
    cfg = AdvantageConfig(estimator=name, **kwargs)
    inputs = AdvantageInputs(rewards_N=torch.tensor(rewards), group_ids_N=torch.tensor(group_ids))
    advantages_N, returns = compute_advantages(inputs, cfg)
    assert returns is None  # an outcome estimator trains no critic
    return advantages_N


def close(actual, expected) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5)


# group 0: three samples 1, 0, 0 (mean 1/3, unbiased std sqrt(1/3)); group 1: all equal; group 2: one sample
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 5.0]
GROUP_IDS = [0, 0, 0, 1, 1, 2]


def test_grpo():
    std = math.sqrt(1 / 3)
    close(advantages("grpo", REWARDS, GROUP_IDS, eps=0.0), [(2 / 3) / std, -(1 / 3) / std, -(1 / 3) / std, 0, 0, 0])


def test_grpo_without_std_is_drgrpo():
    expected = [2 / 3, -1 / 3, -1 / 3, 0, 0, 0]
    close(advantages("grpo", REWARDS, GROUP_IDS, std_normalize=False), expected)
    close(advantages("drgrpo", REWARDS, GROUP_IDS), expected)


def test_zero_variance_group_is_exactly_zero():
    # 0.1 is not exact in float32, so mean - r is round-off: the estimator must not divide it by eps
    for name in ("grpo", "drgrpo", "rloo", "reinforce_pp_baseline"):
        out = advantages(name, [0.1, 0.1, 0.1, 1.0, 0.0], [0, 0, 0, 1, 1])
        assert out[:3].tolist() == [0.0, 0.0, 0.0], name


def test_rloo_leave_one_out_with_unequal_groups():
    out = advantages("rloo", [1.0, 0.0, 0.0, 3.0, 1.0, 7.0], [0, 0, 0, 1, 1, 2])
    # r_i - mean of the other n - 1: 1 - 0, 0 - 0.5, 0 - 0.5; 3 - 1, 1 - 3; singleton 0
    close(out, [1.0, -0.5, -0.5, 2.0, -2.0, 0.0])
    # = n / (n - 1) * (r - group mean)
    close(out[:3], [1.5 * (2 / 3), 1.5 * (-1 / 3), 1.5 * (-1 / 3)])


def test_reinforce_pp_batch_whitening():
    std = math.sqrt(5 / 3)  # unbiased std of 1, 2, 3, 4
    close(
        advantages("reinforce_pp", [1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1], eps=0.0),
        [-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std],
    )
    close(advantages("reinforce_pp", [1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1], std_normalize=False), [-1.5, -0.5, 0.5, 1.5])
    close(advantages("reinforce_pp", [3.0], [0]), [0.0])


def test_reinforce_pp_baseline():
    # centred: group 0 (mean 0.5) -> 0.5, -0.5; group 1 (mean 3) -> -1, -1, 2; group 2 is a singleton: 0, excluded
    out = advantages("reinforce_pp_baseline", [1.0, 0.0, 2.0, 2.0, 5.0, 7.0], [0, 0, 1, 1, 1, 2], eps=0.0)
    std = math.sqrt((0.25 + 0.25 + 1 + 1 + 4) / 4)  # the centred values have mean 0
    close(out, [0.5 / std, -0.5 / std, -1 / std, -1 / std, 2 / std, 0.0])


def test_group_ids_need_not_be_sorted():
    out = advantages("drgrpo", [1.0, 3.0, 0.0, 5.0], [1, 0, 1, 0])
    close(out, [0.5, -1.0, -0.5, 1.0])


@pytest.mark.parametrize("name", OUTCOME)
def test_every_estimator_handles_an_empty_batch(name):
    assert advantages(name, [], []).shape == (0,)


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo", "reinforce_pp_baseline"])
def test_group_estimators_give_singletons_zero(name):
    assert advantages(name, [2.0, 5.0], [0, 1]).tolist() == [0.0, 0.0]


def test_unknown_estimator_is_a_value_error():
    with pytest.raises(
        ValueError, match=r"unknown advantage estimator 'ppo' \(known: distill, drgrpo, gae, grpo, .*\)"
    ):
        AdvantageConfig(estimator="ppo")


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match="1-D"):
        advantages("grpo", [0.0, 0.0, 0.0], [0, 0])
    with pytest.raises(ValueError, match=">= 0"):
        advantages("grpo", [0.0, 0.0], [0, -1])
    with pytest.raises(ValueError, match="eps"):
        AdvantageConfig(eps=-1.0)


# ---------------------------------------------------------------------------------------------------
# gae: per-token advantages and returns from the critic's values


def gae(rewards, values, mask, last_values=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = AdvantageConfig(estimator="gae", std_normalize=False, **kwargs)
    inputs = AdvantageInputs(
        rewards_N=torch.tensor(rewards),
        group_ids_N=torch.zeros(len(rewards), dtype=torch.long),
        values_NR=torch.as_tensor(values),
        mask_NR=torch.as_tensor(mask),
        last_values_N=None if last_values is None else torch.tensor(last_values),
    )
    return compute_advantages(inputs, cfg)


def test_gae_by_hand_terminal_truncated_multi_turn_and_padded():
    """gamma 0.9, lambda 0.8 (gamma lambda = 0.72):
    - sample 0 ends after 3 tokens, reward 1, V = .5 .6 .8: delta = .04 .12 .2, A_2 = .2, A_1 = .12 + .72 * .2,
      A_0 = .04 + .72 * A_1;
    - sample 1 is cut off after 2 tokens (bootstrap V = .5), reward .3, V = .2 .4 (then padding): delta_1 = .3 +
      .9 * .5 - .4 = .35, delta_0 = .9 * .4 - .2 = .16;
    - sample 2 has a tool output between its two sampled tokens (mask 1 0 1): the value there is skipped, token 0's
      successor is token 2: delta_2 = 1 - .3 = .7, delta_0 = .9 * .3 - .1 = .17."""
    advantages, returns = gae(
        rewards=[1.0, 0.3, 1.0],
        values=[[0.5, 0.6, 0.8], [0.2, 0.4, 7.0], [0.1, 9.0, 0.3]],
        mask=[[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]],
        last_values=[0.0, 0.5, 0.0],
        gamma=0.9,
        lam=0.8,
    )
    a1 = 0.12 + 0.72 * 0.2
    expected = [[0.04 + 0.72 * a1, a1, 0.2], [0.16 + 0.72 * 0.35, 0.35, 0.0], [0.17 + 0.72 * 0.7, 0.0, 0.7]]
    close(advantages, expected)
    values = torch.tensor([[0.5, 0.6, 0.8], [0.2, 0.4, 0.0], [0.1, 0.0, 0.3]])
    close(returns, (torch.tensor(expected) + values).tolist())  # returns = advantages + values, on the mask only


def test_gae_lambda_one_is_monte_carlo_returns_minus_values_and_lambda_zero_one_step_td():
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(4, 5, generator=gen).tolist()
    lengths, rewards, gamma = [5, 3, 1, 4], [1.0, 0.0, 2.0, -1.0], 0.9
    mask = [[1.0] * n + [0.0] * (5 - n) for n in lengths]
    last = [0.0, 0.0, 0.0, 0.7]  # the last sample was cut off: its tail is worth 0.7
    mc, td = torch.zeros(4, 5), torch.zeros(4, 5)
    for i, n in enumerate(lengths):
        for t in range(n):
            steps_left = n - 1 - t
            mc[i, t] = gamma**steps_left * rewards[i] + gamma ** (steps_left + 1) * last[i] - values[i][t]
            next_value = values[i][t + 1] if t + 1 < n else last[i]
            td[i, t] = (rewards[i] if t == n - 1 else 0.0) + gamma * next_value - values[i][t]
    close(gae(rewards, values, mask, last, gamma=gamma, lam=1.0)[0], mc.tolist())
    close(gae(rewards, values, mask, last, gamma=gamma, lam=0.0)[0], td.tolist())
    # gamma 0: every token is judged by its own reward alone (the sample's reward on its last token)
    no_future = [[(rewards[i] if t == n - 1 else 0.0) - values[i][t] if t < n else 0.0 for t in range(5)]
                 for i, n in enumerate(lengths)]  # fmt: skip
    close(gae(rewards, values, mask, last, gamma=0.0, lam=0.5)[0], no_future)
    # gamma 1, lambda 1, no bootstrap: the reward minus the value, on every token (an outcome baseline per token)
    flat = gae(rewards, values, mask, gamma=1.0, lam=1.0)[0]
    close(flat, [[(rewards[i] - values[i][t]) * mask[i][t] for t in range(5)] for i in range(4)])


def test_gae_whitens_advantages_over_the_loss_tokens_and_keeps_returns_raw():
    values, mask = [[0.2, 0.4, 0.0], [0.1, 0.5, 0.3]], [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    raw, raw_returns = gae([1.0, 0.0], values, mask, gamma=1.0, lam=0.9)
    inputs = AdvantageInputs(
        rewards_N=torch.tensor([1.0, 0.0]),
        group_ids_N=torch.tensor([0, 1]),
        values_NR=torch.tensor(values),
        mask_NR=torch.tensor(mask),
    )
    whitened, returns = compute_advantages(inputs, AdvantageConfig(estimator="gae", lam=0.9, eps=0.0))
    kept = raw[torch.tensor(mask) > 0]
    close(whitened[torch.tensor(mask) > 0], ((kept - kept.mean()) / kept.std()).tolist())
    assert whitened[0, 2] == 0.0  # off the mask
    close(returns, raw_returns.tolist())


def test_gae_needs_values_and_checks_its_inputs():
    cfg = AdvantageConfig(estimator="gae")
    assert cfg.needs_critic and not AdvantageConfig(estimator="grpo").needs_critic
    bare = AdvantageInputs(rewards_N=torch.zeros(2), group_ids_N=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="needs the critic's values"):
        compute_advantages(bare, cfg)
    with pytest.raises(ValueError, match=r"values and mask must be \[N, R\]"):
        gae([1.0, 0.0], [[0.0, 0.0]], [[1.0, 1.0]])
    with pytest.raises(ValueError, match=r"advantage.lam: must be in \[0, 1\]"):
        AdvantageConfig(estimator="gae", lam=1.5)
    empty, returns = gae([], torch.zeros(0, 0), torch.zeros(0, 0))
    assert empty.shape == returns.shape == (0, 0)
