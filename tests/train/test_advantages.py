"""Hand-computed advantages for every estimator in `leagues.train.advantages`, with unequal group sizes,
zero-variance groups and singleton groups.

Legend: N samples.
"""

import math

import pytest
import torch

from leagues.train.advantages import ADVANTAGE_ESTIMATORS, AdvantageConfig, compute_advantages


def advantages(name: str, rewards, group_ids, **kwargs) -> torch.Tensor:
    cfg = AdvantageConfig(name=name, **kwargs)
    return compute_advantages(torch.tensor(rewards), torch.tensor(group_ids), cfg)


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


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_every_estimator_handles_an_empty_batch(name):
    assert advantages(name, [], []).shape == (0,)


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo", "reinforce_pp_baseline"])
def test_group_estimators_give_singletons_zero(name):
    assert advantages(name, [2.0, 5.0], [0, 1]).tolist() == [0.0, 0.0]


def test_unknown_estimator_is_a_value_error():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo' \(known: drgrpo, grpo, .*\)"):
        AdvantageConfig(name="ppo")


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match="1-D"):
        compute_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long), AdvantageConfig())
    with pytest.raises(ValueError, match=">= 0"):
        compute_advantages(torch.zeros(2), torch.tensor([0, -1]), AdvantageConfig())
    with pytest.raises(ValueError, match="eps"):
        AdvantageConfig(eps=-1.0)
