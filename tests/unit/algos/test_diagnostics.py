"""Rollout silence and advantage collapse metrics, docs/algorithm.md §5."""

import math
import re

import pytest
import torch

from shuffle_r1.algos import (
    advantage_based_batch_shuffle,
    advantage_collapse_share,
    advantage_histogram,
    grpo_advantages,
    nonzero_gradient_share,
    pairwise_trajectory_sampling,
    rollout_silence_ratio,
)


def test_silence_by_hand():
    advantages = torch.tensor([1.0, 0.0, -0.5, -0.5, 2.0, 1e-4])
    truncated = torch.tensor([False, False, True, False, True, False])
    # silent: rollout 1 (A = 0) and rollout 2 (A < 0, truncated); 4 is truncated but A > 0,
    # and 5 is tiny but not 0
    assert nonzero_gradient_share(advantages, truncated) == pytest.approx(4 / 6)
    assert rollout_silence_ratio(advantages, truncated) == pytest.approx(2 / 6)


def test_zero_advantage_is_silent_even_if_not_truncated():
    advantages = torch.zeros(4)
    assert rollout_silence_ratio(advantages, torch.zeros(4, dtype=torch.bool)) == 1.0


def test_collapse_by_hand():
    advantages = torch.tensor([0.05, -0.09, 0.1, -0.2, 0.0])
    assert advantage_collapse_share(advantages) == pytest.approx(3 / 5)  # |0.1| is not < 0.1
    assert advantage_collapse_share(advantages, tau=0.25) == 1.0


def test_histogram_by_hand():
    advantages = torch.tensor([-5.0, -3.0, -0.5, 0.0, 2.99, 3.0, 4.0])
    counts, edges = advantage_histogram(advantages, bins=6, range=(-3.0, 3.0))
    assert edges.tolist() == [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]
    # -5 and -3 in the first bin, -0.5 in [-1, 0), 0 in [0, 1), 2.99, 3 and 4 in the last
    assert counts.tolist() == [2, 0, 1, 1, 0, 3]
    assert counts.dtype == torch.long


def test_empty_input_gives_nan():
    empty = torch.zeros(0)
    assert math.isnan(nonzero_gradient_share(empty, empty.bool()))
    assert math.isnan(rollout_silence_ratio(empty, empty.bool()))
    assert math.isnan(advantage_collapse_share(empty))
    assert advantage_histogram(empty, bins=3)[0].tolist() == [0, 0, 0]


def test_invalid_inputs():
    with pytest.raises(ValueError, match=re.escape("got (2, 2)")):
        advantage_collapse_share(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=re.escape("truncated has shape (3,)")):
        rollout_silence_ratio(torch.zeros(4), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="tau"):
        advantage_collapse_share(torch.zeros(4), tau=0.0)
    with pytest.raises(ValueError, match="bins"):
        advantage_histogram(torch.zeros(4), bins=0)


def test_metrics_through_grpo_pts_abs():
    """Binary rewards through §1 → §2 → §3: GRPO trains on the all-equal groups' silent
    rollouts; the shuffled batch never draws them, so no drawn rollout is silent."""
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(32, 16, generator=g) < 0.2).float()
    rewards[:8] = 1.0  # solved by every rollout
    rewards[8:12] = 0.0  # solved by none
    advantages = grpo_advantages(rewards)
    not_truncated = torch.zeros(advantages.numel(), dtype=torch.bool)
    grpo_share = nonzero_gradient_share(advantages.flatten(), not_truncated)
    silent_groups = int((rewards.min(1).values == rewards.max(1).values).sum())
    assert grpo_share == pytest.approx(1 - silent_groups / 32)
    assert advantage_collapse_share(advantages.flatten()) >= silent_groups / 32

    selection = pairwise_trajectory_sampling(advantages, keep_ratio=0.5)
    shuffle = advantage_based_batch_shuffle(selection.weights.flatten(), 8, generator=g)
    assert shuffle.indices.numel() == 32 * 4 and not shuffle.skipped
    group = shuffle.indices // 4
    pairs = selection.pairs.reshape(-1, 2)[shuffle.indices]
    trained = advantages[group[:, None], pairs].flatten()
    assert nonzero_gradient_share(trained, torch.zeros_like(trained, dtype=torch.bool)) == 1.0
    assert advantage_collapse_share(trained) == 0.0
    assert advantage_histogram(trained)[0].sum().item() == trained.numel()
