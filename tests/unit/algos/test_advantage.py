"""GRPO advantage, docs/algorithm.md §1 and the A column of §8."""

import math
import re
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shuffle_r1.algos import grpo_advantages

WORKED = [  # §8: rewards, A rounded to 4 decimals
    ([1, 0, 0, 1], [0.8660, -0.8660, -0.8660, 0.8660]),
    ([1, 0.1, 0, 0.1], [1.4924, -0.4264, -0.6396, -0.4264]),
    ([1, 1, 1, 1], [0.0, 0.0, 0.0, 0.0]),
    ([1, 0, 0, 0, 0, 0, 1, 0], [1.6202] + [-0.5401] * 5 + [1.6202, -0.5401]),
]


@pytest.mark.parametrize(("rewards", "expected"), WORKED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_worked_examples(rewards, expected, dtype):
    a = grpo_advantages(torch.tensor([rewards], dtype=dtype))
    assert a.dtype == dtype
    assert [round(x, 4) for x in a[0].tolist()] == pytest.approx(expected, abs=1e-12)


def test_groups_are_normalised_independently():
    rewards = torch.tensor([[1.0, 0, 0, 1], [3.0, 3, 3, 3], [10.0, 0, 0, 10]])
    a = grpo_advantages(rewards)
    assert torch.allclose(a[0], a[2], atol=1e-6)
    assert torch.equal(a[1], torch.zeros(4))


@settings(deadline=None, max_examples=100)
@given(
    st.lists(
        st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=9),
        min_size=1,
        max_size=4,
    ).filter(lambda groups: len({len(g) for g in groups}) == 1)
)
def test_matches_statistics_reference(groups):
    a = grpo_advantages(torch.tensor(groups, dtype=torch.float64))
    for g, group in enumerate(groups):
        mean, std = statistics.fmean(group), statistics.stdev(group)
        for j, r in enumerate(group):
            assert a[g, j].item() == pytest.approx((r - mean) / (std + 1e-6), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reward", [0.7, 0.1, 5.3, 1.0, 0.0])
def test_equal_rewards_give_exact_zero(reward, dtype):
    # float32 sums of 0.7 round, so a naive (r - mean) / (std + eps) gives |A| ~ 0.06 here
    a = grpo_advantages(torch.full((3, 16), reward, dtype=dtype))
    assert torch.equal(a, torch.zeros(3, 16, dtype=dtype))


def test_group_of_one_uses_mean_zero_std_one():
    a = grpo_advantages(torch.tensor([[2.0], [-1.0]], dtype=torch.float64))
    assert a[:, 0].tolist() == pytest.approx([2 / (1 + 1e-6), -1 / (1 + 1e-6)], rel=1e-12)


def test_integer_rewards_become_float():
    a = grpo_advantages(torch.tensor([[1, 0, 0, 1]]))
    assert a.is_floating_point()
    assert a[0, 0].item() == pytest.approx(math.sqrt(3) / 2, rel=1e-5)


@pytest.mark.parametrize("shape", [(4,), (2, 0), (1, 2, 2)])
def test_bad_shape_is_named(shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        grpo_advantages(torch.zeros(shape))


def test_nan_reward_names_position():
    with pytest.raises(ValueError, match="group 1, rollout 2"):
        grpo_advantages(torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, float("nan")]]))
