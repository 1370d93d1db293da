"""Pairwise Trajectory Sampling, docs/algorithm.md §2 and the pairs/W/kept columns of §8."""

import itertools
import math
import re
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shuffle_r1.algos import grpo_advantages, pairs_kept, pairwise_trajectory_sampling

WORKED = [  # §8 (α = 0.5): rewards, all pairs, W per pair, kept pairs
    ([1, 0, 0, 1], [(0, 2), (3, 1)], [1.7320, 1.7320], [(0, 2)]),
    ([1, 0.1, 0, 0.1], [(0, 2), (1, 3)], [2.1320, 0.8528], [(0, 2)]),
    ([1, 1, 1, 1], [(0, 3), (1, 2)], [0.0, 0.0], [(0, 3)]),
    ([1, 0, 0, 0, 0, 0, 1, 0], [(0, 7), (6, 5), (1, 4), (2, 3)],
     [2.1602, 2.1602, 1.0801, 1.0801], [(0, 7), (6, 5)]),
]  # fmt: skip


def as_pairs(selection, g=0):
    return [tuple(p) for p in selection.pairs[g].tolist()]


@pytest.mark.parametrize(("rewards", "pairs", "weights", "kept"), WORKED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_worked_examples(rewards, pairs, weights, kept, dtype):
    a = grpo_advantages(torch.tensor([rewards], dtype=dtype))
    every = pairwise_trajectory_sampling(a, keep_ratio=1.0)
    assert as_pairs(every) == pairs
    assert [round(w, 4) for w in every.weights[0].tolist()] == pytest.approx(weights, abs=1e-12)
    selection = pairwise_trajectory_sampling(a, keep_ratio=0.5)
    assert as_pairs(selection) == kept
    assert selection.pairs.dtype == torch.long
    assert selection.weights.tolist() == every.weights[:, : len(kept)].tolist()


def test_reference_recipe_keeps_four_of_eight_pairs():
    rewards = torch.tensor([[1.0, 0.0] * 8, [0.0] * 15 + [1.0]])
    selection = pairwise_trajectory_sampling(grpo_advantages(rewards), keep_ratio=0.5)
    assert selection.pairs.shape == (2, 4, 2)
    assert len(set(selection.pairs[0].flatten().tolist())) == 8
    # group 2: the single success (rollout 15) is paired with the first failure in order
    assert as_pairs(selection, 1)[0] == (15, 14)


def test_ties_keep_rollout_order():
    a = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]])
    selection = pairwise_trajectory_sampling(a, keep_ratio=1.0)
    # stable descending order: 1, 3, 5, 7, 0, 2, 4, 6, 8, 9
    assert as_pairs(selection) == [(1, 9), (3, 8), (5, 6), (7, 4), (0, 2)]


def stable_reference(advantages, kept):
    """Python's sort is stable: rank by -A, pair the ends."""
    n = len(advantages)
    order = sorted(range(n), key=lambda j: -advantages[j])
    return [(order[i], order[n - 1 - i]) for i in range(kept)]


@pytest.mark.parametrize("n", [64, 1024])
def test_ties_keep_rollout_order_in_large_groups(n):
    # torch's unstable CPU sort reorders ties from about 64 elements on
    rewards = (torch.arange(n) % 3 == 0).double().reshape(1, n)
    a = grpo_advantages(rewards)
    assert as_pairs(pairwise_trajectory_sampling(a, 1.0)) == stable_reference(a[0].tolist(), n // 2)


groups = st.integers(1, 8).flatmap(
    lambda half: st.lists(
        st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), min_size=2 * half, max_size=2 * half),
        min_size=1,
        max_size=4,
    )
)


@settings(deadline=None, max_examples=200)
@given(groups, st.data())
def test_pairs_properties(rewards, data):
    n = len(rewards[0])
    kept = data.draw(st.integers(1, n // 2))
    a = grpo_advantages(torch.tensor(rewards, dtype=torch.float64))
    selection = pairwise_trajectory_sampling(a, keep_ratio=kept / (n // 2))
    assert selection.pairs.shape == (len(rewards), kept, 2)
    assert selection.contrast.shape == selection.weights.shape == (len(rewards), kept)
    for g in range(len(rewards)):
        pairs = as_pairs(selection, g)
        assert pairs == stable_reference(a[g].tolist(), kept)
        flat = [j for pair in pairs for j in pair]
        assert all(0 <= j < n for j in flat)
        assert len(set(flat)) == 2 * kept  # distinct, highs and lows disjoint
        # the kept rollouts are the kept highest and the kept lowest of the group
        ranked = sorted(a[g].tolist(), reverse=True)
        kept_values = sorted((a[g, j].item() for j in flat), reverse=True)
        assert kept_values == ranked[:kept] + ranked[-kept:]
        contrast = selection.contrast[g].tolist()
        assert all(x >= y for x, y in itertools.pairwise(contrast))
        for (hi, lo), c, w in zip(pairs, contrast, selection.weights[g].tolist(), strict=True):
            assert c == a[g, hi].item() - a[g, lo].item() >= 0
            assert w == abs(a[g, hi].item()) + abs(a[g, lo].item())
        if len(set(rewards[g])) == 1:  # all equal: A = 0, still kept, weight 0, rollout order
            assert pairs == [(i, n - 1 - i) for i in range(kept)]
            assert selection.weights[g].tolist() == [0.0] * kept


@settings(deadline=None, max_examples=200)
@given(st.integers(1, 32), st.floats(0.0, 1.0, exclude_min=True))
def test_kept_count_is_floor(half, keep_ratio):
    n = 2 * half
    exact = Fraction(keep_ratio) * n / 2
    expected = math.floor(exact)
    if math.ceil(exact) - exact < Fraction(1, 10**9):  # within float rounding of the next
        expected = math.ceil(exact)
    if expected == 0:
        with pytest.raises(ValueError, match=f"keeps no pair for group size {n}"):
            pairwise_trajectory_sampling(torch.zeros(1, n), keep_ratio)
        return
    assert pairs_kept(n, keep_ratio) == expected
    assert pairwise_trajectory_sampling(torch.randn(2, n), keep_ratio).pairs.shape[1] == expected


def test_complement_of_pruning_ratio_keeps_its_pair():
    # the reference config gives the dropped share; 1 - 0.9 is 0.09999999999999998
    assert pairs_kept(20, 1 - 0.9) == 1
    assert pairs_kept(16, 1 - 0.5) == 4


@pytest.mark.parametrize("shape", [(2, 5), (4,), (1, 0)])
def test_bad_shape_is_named(shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        pairwise_trajectory_sampling(torch.zeros(shape), 0.5)


@pytest.mark.parametrize("keep_ratio", [0.0, -0.5, 1.5])
def test_keep_ratio_out_of_range(keep_ratio):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        pairwise_trajectory_sampling(torch.zeros(1, 4), keep_ratio)


def test_keep_ratio_that_keeps_nothing():
    with pytest.raises(ValueError, match="keeps no pair for group size 4"):
        pairwise_trajectory_sampling(torch.zeros(1, 4), 0.4)


def test_nan_advantage_is_named():
    with pytest.raises(ValueError, match="group 0, rollout 1"):
        pairwise_trajectory_sampling(torch.tensor([[0.0, float("nan")]]), 1.0)
