"""Advantage-based Batch Shuffle, docs/algorithm.md §3 (with its three required improvements)."""

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shuffle_r1.algos import abs_round_sizes, advantage_based_batch_shuffle


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def split_rounds(indices, sizes):
    rounds, start = [], 0
    for size in sizes:
        rounds.append(indices[start : start + size])
        start += size
    assert start == len(indices)
    return rounds


@pytest.mark.parametrize(
    ("num_pairs", "shuffle_times", "sizes"),
    [
        (2048, 8, [256] * 8),  # the reference recipe: 512 prompts × 4 kept pairs, S = 8
        (10, 4, [3, 3, 2, 2]),  # P mod S = 2: the first two rounds draw one more
        (3, 5, [1, 1, 1, 0, 0]),
        (7, 1, [7]),
        (0, 3, [0, 0, 0]),
    ],
)
def test_round_sizes(num_pairs, shuffle_times, sizes):
    assert abs_round_sizes(num_pairs, shuffle_times) == sizes


@pytest.mark.parametrize(("num_pairs", "shuffle_times"), [(-1, 2), (4, 0)])
def test_round_sizes_reject(num_pairs, shuffle_times):
    with pytest.raises(ValueError):
        abs_round_sizes(num_pairs, shuffle_times)


def test_probabilities_are_normalised_weights():
    w = torch.tensor([2.1320, 0.0, 1.7320, 1.7320], dtype=torch.float64)
    result = advantage_based_batch_shuffle(w, shuffle_times=2, generator=seeded())
    assert result.probabilities.tolist() == pytest.approx([0.3809, 0.0, 0.3095, 0.3095], abs=1e-4)
    assert result.probabilities.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(result.draw_probabilities, result.probabilities[result.indices])


weights = st.lists(st.one_of(st.just(0.0), st.floats(0.01, 5.0)), min_size=1, max_size=40)


@settings(deadline=None, max_examples=200)
@given(weights, st.integers(2, 12), st.integers(0, 2**31))
def test_draw_properties(w, shuffle_times, seed):
    pair_weights = torch.tensor(w, dtype=torch.float64)
    result = advantage_based_batch_shuffle(pair_weights, shuffle_times, generator=seeded(seed))
    num_pairs, drawable = len(w), sum(x > 0 for x in w)
    wanted = abs_round_sizes(num_pairs, shuffle_times)
    drawn = [min(t, drawable) for t in wanted]
    indices = result.indices.tolist()

    assert result.indices.dtype == torch.long
    assert result.shortfall == sum(wanted) - sum(drawn) == num_pairs - len(indices)
    assert result.skipped == (drawable == 0)
    for round_indices in split_rounds(indices, drawn):
        assert len(set(round_indices)) == len(round_indices)  # without replacement
    assert all(w[p] > 0 for p in indices)  # zero-weight pairs never drawn
    assert max(Counter(indices).values(), default=0) <= shuffle_times
    if drawable:
        assert result.probabilities.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert result.draw_probabilities.tolist() == [result.probabilities[p].item() for p in indices]


def test_one_shuffle_keeps_every_pair_in_order():
    w = torch.tensor([0.0, 3.0, 1.0, 0.0])
    result = advantage_based_batch_shuffle(w, shuffle_times=1, generator=seeded())
    assert result.indices.tolist() == [0, 1, 2, 3]
    assert result.draw_probabilities.tolist() == pytest.approx([0.0, 0.75, 0.25, 0.0])
    assert (result.shortfall, result.skipped) == (0, False)


def test_shortfall_when_round_wants_more_than_nonzero_pairs():
    w = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 2.0])  # 2 drawable, rounds want 3 each
    result = advantage_based_batch_shuffle(w, shuffle_times=2, generator=seeded())
    assert sorted(result.indices[:2].tolist()) == [1, 5]
    assert sorted(result.indices[2:].tolist()) == [1, 5]
    assert (result.shortfall, result.skipped) == (2, False)


@pytest.mark.parametrize("num_pairs", [0, 5])
def test_all_zero_weights_skip(num_pairs):
    result = advantage_based_batch_shuffle(torch.zeros(num_pairs), 4, generator=seeded())
    assert result.skipped
    assert result.indices.numel() == result.draw_probabilities.numel() == 0
    assert result.shortfall == num_pairs
    assert result.probabilities.tolist() == [0.0] * num_pairs


def test_recurrence_reaches_s_for_a_dominant_pair():
    w = torch.tensor([1000.0, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    result = advantage_based_batch_shuffle(w, shuffle_times=8, generator=seeded())
    assert Counter(result.indices.tolist())[0] == 8


def test_same_seed_same_draw_other_seed_other_draw():
    w = torch.rand(64, generator=seeded(1))
    first = advantage_based_batch_shuffle(w, 8, generator=seeded(7)).indices
    again = advantage_based_batch_shuffle(w, 8, generator=seeded(7)).indices
    other = advantage_based_batch_shuffle(w, 8, generator=seeded(8)).indices
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def chi_square(counts, probabilities):
    total = sum(counts)
    return sum(
        (c - total * p) ** 2 / (total * p) for c, p in zip(counts, probabilities, strict=True)
    )


def test_single_pair_rounds_follow_phi():
    """S = P: every round draws one pair, a plain categorical draw from Φ."""
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 0.0])
    generator = seeded(1234)
    counts = Counter()
    for _ in range(2000):
        counts.update(advantage_based_batch_shuffle(w, 8, generator=generator).indices.tolist())
    assert counts[7] == 0
    observed = [counts[p] for p in range(7)]
    phi = (w[:7] / w.sum()).tolist()
    # chi-square, 6 degrees of freedom, 0.999 quantile (tables: 22.458)
    critical = 22.458
    assert chi_square(observed, phi) < critical
    # the test has power: the same draws are far from a uniform draw
    assert chi_square(observed, [1 / 7] * 7) > critical


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0, -0.5, 2.0], "pair weight 1 is -0.5"),
        ([1.0, 2.0, float("nan")], "pair weight 2 is nan"),
        ([float("inf"), 1.0], "pair weight 0 is inf"),
    ],
)
def test_bad_weight_is_named(weights, match):
    with pytest.raises(ValueError, match=match):
        advantage_based_batch_shuffle(torch.tensor(weights), 2)


@pytest.mark.parametrize("pair_weights", [torch.ones(2, 2), torch.ones(4, dtype=torch.long)])
def test_bad_tensor(pair_weights):
    with pytest.raises(ValueError, match="1-D float"):
        advantage_based_batch_shuffle(pair_weights, 2)


def test_bad_shuffle_times():
    with pytest.raises(ValueError, match="shuffle_times"):
        advantage_based_batch_shuffle(torch.ones(4), 0)
