"""PTS and ABS through the service equal the library's on the same input (docs/algorithm.md §1-§3).

The expected batch is computed here with ``shuffle_r1.algos`` from the rewards as put: the
step's pairs are flattened group by group in ascending prompt_id order, and ABS is seeded
with the service's documented per-step generator (run seed, step).
"""

import uuid

import pytest
import torch
from buffer_helpers import make_group, run_keys
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import replay_buffer_pb2 as pb
from services.replay_buffer.logic import step_generator
from shuffle_r1.algos import (
    advantage_based_batch_shuffle,
    grpo_advantages,
    pairwise_trajectory_sampling,
)


def library_batch(groups, keep_ratio, shuffle_times, seed, step):
    """[(prompt_id, rollout_index, pair_index, draw_probability, advantage)], shortfall,
    skipped, P — computed with the library alone."""
    groups = sorted(groups, key=lambda g: g.prompt_id)
    rewards = torch.tensor([[r.reward for r in g.rollouts] for g in groups], dtype=torch.float64)
    advantages = grpo_advantages(rewards)
    selection = pairwise_trajectory_sampling(advantages, keep_ratio)
    kept = selection.pairs.shape[1]
    drawn = advantage_based_batch_shuffle(
        selection.weights.flatten(), shuffle_times, step_generator(seed, step)
    )
    items = []
    for p, phi in zip(drawn.indices.tolist(), drawn.draw_probabilities.tolist(), strict=True):
        g, k = divmod(p, kept)
        for j in selection.pairs[g, k].tolist():
            items.append((groups[g].prompt_id, j, p, phi, advantages[g, j].item()))
    return items, drawn.shortfall, drawn.skipped, selection.weights.numel()


def service_batch(batch):
    return [
        (i.prompt_id, i.rollout_index, i.pair_index, i.draw_probability, i.advantage)
        for i in batch.items
    ]


def test_worked_examples_of_section_8(buffer, run_id):
    # docs/algorithm.md §8, α = 0.5, S = 1: the kept pair of each row and its weight W.
    rows = {
        "a": ([1, 0, 0, 1], (0, 2), 1.7320508),
        "b": ([1, 0.1, 0, 0.1], (0, 2), 2.1320),
        "c": ([1, 1, 1, 1], (0, 3), 0.0),
        "d": ([1, 0, 0, 0, 0, 0, 1, 0], [(0, 7), (6, 5)], 2.1602),
    }
    groups = [make_group(run_id, 0, pid, rewards) for pid, (rewards, _, _) in rows.items()]
    buffer.client.put_groups(groups, spec=pb.RunSpec(algorithm="grpo+pts", keep_ratio=0.5))
    batch = buffer.client.sample(run_id, 0, policy_version=0)
    pairs = [(i.prompt_id, i.rollout_index) for i in batch.items]
    assert pairs == [("a", 0), ("a", 2), ("b", 0), ("b", 2), ("c", 0), ("c", 3),
                     ("d", 0), ("d", 7), ("d", 6), ("d", 5)]  # fmt: skip
    total = 1.7320508 + 2.1320 + 0.0 + 2 * 2.1602
    phi = [i.draw_probability for i in batch.items[0::2]]
    assert phi == pytest.approx([1.7320508 / total, 2.1320 / total, 0.0, 2.1602 / total,
                                 2.1602 / total], abs=1e-4)  # fmt: skip


@pytest.mark.parametrize(
    ("count", "n", "keep_ratio", "shuffle_times"),
    [(16, 8, 0.5, 8), (7, 16, 0.5, 3), (5, 4, 1.0, 1), (3, 6, 0.75, 5)],
)
def test_batch_equals_library(buffer, run_id, count, n, keep_ratio, shuffle_times):
    rng = torch.Generator().manual_seed(count * n)
    groups = [
        make_group(run_id, 9, f"q{i}", (torch.rand(n, generator=rng) < 0.4).double().tolist())
        for i in reversed(range(count))  # put order differs from the draw's prompt_id order
    ]
    spec = pb.RunSpec(algorithm="shuffle_r1", keep_ratio=keep_ratio, shuffle_times=shuffle_times,
                      seed=1234)  # fmt: skip
    buffer.client.put_groups(groups, spec=spec)
    batch = buffer.client.sample(run_id, 9, policy_version=0)
    items, shortfall, skipped, pairs_total = library_batch(groups, keep_ratio, shuffle_times,
                                                           1234, 9)  # fmt: skip
    assert service_batch(batch) == items
    assert (batch.shortfall, batch.skipped, batch.pairs_total) == (shortfall, skipped, pairs_total)
    # the draw is a function of (seed, step): again the same, another step another draw
    assert buffer.client.sample(run_id, 9, policy_version=0) == batch


def test_seed_and_step_change_the_draw(buffer, run_id):
    groups = [make_group(run_id, s, f"q{i}", [1, 0, 0.5, 0, 1, 0, 0, 1]) for s in (0, 1)
              for i in range(12)]  # fmt: skip
    buffer.client.put_groups(groups)
    first = service_batch(buffer.client.sample(run_id, 0, policy_version=0))
    second = service_batch(buffer.client.sample(run_id, 1, policy_version=0))
    assert [i[1:] for i in first] != [i[1:] for i in second]  # same rewards, other step


def test_shortfall_and_skipped(buffer, run_id):
    # one group with a weighted pair, three of equal rewards (weight 0): P = 4, S = 2 wants
    # 2 pairs per round but only one pair can be drawn.
    groups = [make_group(run_id, 0, "a", [1, 0, 0, 0])] + [
        make_group(run_id, 0, f"z{i}", [1, 1, 1, 1]) for i in range(3)
    ]
    spec = pb.RunSpec(algorithm="shuffle_r1", keep_ratio=0.5, shuffle_times=2)
    buffer.client.put_groups(groups, spec=spec)
    batch = buffer.client.sample(run_id, 0, policy_version=0)
    assert (batch.pairs_total, batch.shortfall, batch.skipped) == (4, 2, False)
    assert [i.prompt_id for i in batch.items] == ["a"] * 4
    assert [i.draw_probability for i in batch.items] == [1.0] * 4

    zero = [make_group(run_id, 1, f"z{i}", [0, 0, 0, 0]) for i in range(3)]
    buffer.client.put_groups(zero)
    empty = buffer.client.sample(run_id, 1, policy_version=0)
    assert (len(empty.items), empty.skipped, empty.shortfall) == (0, True, 3)
    assert buffer.metric("shuffle_r1_buffer_skipped_batches_total") == 1


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rewards=st.lists(
        st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0]), min_size=4, max_size=4),
        min_size=1,
        max_size=6,
    ),
    keep_ratio=st.sampled_from([0.5, 1.0]),
    shuffle_times=st.integers(1, 5),
    seed=st.integers(0, 2**63 - 1),
    step=st.integers(0, 10**6),
)
def test_any_batch_equals_library(
    buffer, redis_client, rewards, keep_ratio, shuffle_times, seed, step
):
    run = f"test-h-{uuid.uuid4().hex[:12]}"
    try:
        groups = [make_group(run, step, f"g{i}", r) for i, r in enumerate(rewards)]
        spec = pb.RunSpec(keep_ratio=keep_ratio, shuffle_times=shuffle_times, seed=seed)
        buffer.client.put_groups(groups, spec=spec)
        batch = buffer.client.sample(run, step, policy_version=0)
        items, shortfall, skipped, _ = library_batch(groups, keep_ratio, shuffle_times, seed, step)
        assert service_batch(batch) == items
        assert (batch.shortfall, batch.skipped) == (shortfall, skipped)
    finally:
        keys = run_keys(redis_client, run)
        if keys:
            redis_client.delete(*keys)
