"""The optimizer mini-batches of an ABS batch (issue #16): ``interleaved`` must be the
upstream layout, simulated here as upstream builds it: the batch is chunked across
data-parallel ranks (one ABS round each), each rank splits its chunk into mini-batches of
``T / K`` pairs, and optimizer step k takes every rank's k-th mini-batch."""

from __future__ import annotations

import pytest
import torch

from shuffle_r1.algos import abs_round_sizes, advantage_based_batch_shuffle
from shuffle_r1.config import ConfigError, load_config
from shuffle_r1.minibatches import abs_minibatch_rows, minibatch_pair_stats, minibatch_slices


def upstream_steps(pairs_in_draw_order: list[int], ranks: int, steps: int) -> list[list[int]]:
    """verl-style: ``DataProto.chunk(ranks)`` (equal contiguous chunks), then on every rank
    ``split(len(chunk) // steps)``; optimizer step k = rank 0's k-th split, rank 1's, ..."""
    per_rank = len(pairs_in_draw_order) // ranks
    chunks = [pairs_in_draw_order[r * per_rank : (r + 1) * per_rank] for r in range(ranks)]
    size = per_rank // steps
    splits = [[c[i : i + size] for i in range(0, len(c), size)] for c in chunks]
    return [[p for r in range(ranks) for p in splits[r][k]] for k in range(steps)]


def rows_to_pairs(rows: list[int], order: list[int]) -> list[int]:
    assert all(rows[i] % 2 == 0 and rows[i + 1] == rows[i] + 1 for i in range(0, len(rows), 2))
    return [order[r // 2] for r in rows[::2]]


@pytest.mark.parametrize(("shuffle_times", "pairs", "steps"), [(8, 64, 4), (4, 32, 4), (8, 16, 2)])
def test_interleaved_is_the_upstream_layout(shuffle_times: int, pairs: int, steps: int) -> None:
    weights = torch.rand(pairs, generator=torch.Generator().manual_seed(pairs)) + 0.01
    drawn = advantage_based_batch_shuffle(weights, shuffle_times, torch.Generator().manual_seed(7))
    order = drawn.indices.tolist()
    assert list(drawn.round_sizes) == abs_round_sizes(pairs, shuffle_times)
    rollouts_per_step = 2 * pairs // steps
    ours = abs_minibatch_rows(drawn.round_sizes, rollouts_per_step, "interleaved")
    expected = upstream_steps(order, ranks=shuffle_times, steps=steps)
    assert [rows_to_pairs(rows, order) for rows in ours] == expected
    # the first step holds each round's first draws
    t = pairs // shuffle_times
    firsts = {order[r * t] for r in range(shuffle_times)}
    assert firsts <= set(rows_to_pairs(ours[0], order))


def test_sequential_gives_whole_rounds_as_before() -> None:
    rows = abs_minibatch_rows([4, 4, 4, 4], 8, "sequential")
    assert rows == [list(range(s.start, s.stop)) for s in minibatch_slices(32, 8)]
    assert rows[0] == list(range(8))  # round 0 only


def test_one_round_is_the_same_in_both_orders() -> None:
    assert abs_minibatch_rows([12], 6, "interleaved") == abs_minibatch_rows([12], 6, "sequential")


@pytest.mark.parametrize(
    "round_sizes", [[3, 3, 2, 2], [5, 4, 4, 4], [1, 1, 1, 1], [2, 1], [7], [3, 0, 3], [6, 6, 5]]
)
@pytest.mark.parametrize("per_step", [2, 4, 6, 8])
def test_uneven_rounds_are_balanced_pair_whole_and_complete(round_sizes, per_step) -> None:
    total = 2 * sum(round_sizes)
    ours = abs_minibatch_rows(round_sizes, per_step, "interleaved")
    sequential = abs_minibatch_rows(round_sizes, per_step, "sequential")
    assert len(ours) == len(sequential)  # the same number of optimizer steps
    assert sorted(r for rows in ours for r in rows) == list(range(total))  # every row once
    sizes = [len(rows) // 2 for rows in ours]
    assert all(rows for rows in ours) and max(sizes) - min(sizes) <= 1
    for rows in ours:  # pairs whole, and each round's part in draw order
        assert all(rows[i] % 2 == 0 and rows[i + 1] == rows[i] + 1 for i in range(0, len(rows), 2))
        assert rows == sorted(rows)
    starts = [2 * sum(round_sizes[:r]) for r in range(len(round_sizes) + 1)]
    for r in range(len(round_sizes)):  # round r's parts, step by step, are contiguous
        seen = [row for rows in ours for row in rows if starts[r] <= row < starts[r + 1]]
        assert seen == list(range(starts[r], starts[r + 1]))


@pytest.mark.parametrize(
    ("args", "match"),
    [(([2, 2], 4, "random"), "order must be one of"), (([2, -1], 4), "round sizes"),
     (([2, 2], 3), "even number")],
)  # fmt: skip
def test_bad_arguments_are_named(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        abs_minibatch_rows(*args)


def test_pair_stats_count_distinct_pairs_and_repeats() -> None:
    pair_of_row = [5, 5, 2, 2, 5, 5, 9, 9]
    stats = minibatch_pair_stats(pair_of_row, [[0, 1, 2, 3, 4, 5], [6, 7]])
    assert stats == {
        "minibatches": 2.0,
        "pairs_per_minibatch": 2.0,
        "distinct_pairs_per_minibatch": 1.5,
        "max_multiplicity": 2.0,
        "distinct_pairs": 3.0,
    }


def test_the_order_is_a_checked_config_key(tmp_path) -> None:
    assert load_config(None, []).algorithm.abs_minibatch_order == "interleaved"
    with pytest.raises(ConfigError, match="abs_minibatch_order"):
        load_config(None, ["algorithm.abs_minibatch_order=shuffled"])
