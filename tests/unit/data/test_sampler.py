"""The prompt sampler: seeded epoch permutations, exact resume, epoch rollover."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shuffle_r1.data import PromptSampler, load_examples

DATA = Path(__file__).resolve().parents[3] / "data"


def draw(sampler: PromptSampler, batches: int) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(batches)]


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    a, b, c = (PromptSampler(100, 8, seed=s) for s in (3, 3, 4))
    assert draw(a, 30) == draw(b, 30)
    assert draw(PromptSampler(100, 8, seed=3), 30) != draw(c, 30)


@pytest.mark.parametrize("drop_last", [True, False])
def test_epochs_are_permutations_and_roll_over(drop_last: bool) -> None:
    sampler = PromptSampler(10, 4, seed=0, drop_last=drop_last)
    per_epoch = sampler.batches_per_epoch
    assert per_epoch == (2 if drop_last else 3)
    epochs = []
    for epoch in range(3):
        batches = draw(sampler, per_epoch)
        assert sampler.epoch == epoch
        assert [len(b) for b in batches] == ([4, 4] if drop_last else [4, 4, 2])
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == len(flat)  # no index twice within an epoch
        if not drop_last:
            assert sorted(flat) == list(range(10))
        epochs.append(flat)
    sampler.next_batch()
    assert sampler.epoch == 3
    assert epochs[0] != epochs[1] != epochs[2]  # each epoch has its own order


def test_no_shuffle_is_file_order() -> None:
    sampler = PromptSampler(5, 2, seed=0, shuffle=False, drop_last=False)
    assert draw(sampler, 4) == [[0, 1], [2, 3], [4], [0, 1]]


def test_real_gsm8k_epoch_covers_the_dataset() -> None:
    examples = load_examples(
        DATA / "gsm8k" / "test.jsonl", problem_key="question", answer_format="gsm8k"
    ).examples
    sampler = PromptSampler(len(examples), 128, seed=1)
    batches = draw(sampler, sampler.batches_per_epoch)
    uids = [examples[i].uid for b in batches for i in b]
    assert len(batches) == 1319 // 128 and len(set(uids)) == len(uids) == 1280
    assert sampler.next_batch() and sampler.epoch == 1


@settings(max_examples=200, deadline=None)
@given(
    num_examples=st.integers(1, 40),
    batch_size=st.integers(1, 12),
    seed=st.integers(0, 2**32),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    before=st.integers(0, 25),
    after=st.integers(1, 25),
)
def test_resume_at_any_point_gives_the_same_remaining_batches(
    num_examples: int,
    batch_size: int,
    seed: int,
    shuffle: bool,
    drop_last: bool,
    before: int,
    after: int,
) -> None:
    assume(not (drop_last and batch_size > num_examples))  # refused at construction
    args = (num_examples, batch_size, seed, shuffle, drop_last)
    uninterrupted = PromptSampler(*args)
    expected = draw(uninterrupted, before + after)[before:]

    original = PromptSampler(*args)
    draw(original, before)
    state = json.loads(json.dumps(original.state_dict()))  # as a checkpoint stores it
    resumed = PromptSampler(*args)
    resumed.load_state_dict(state)
    assert draw(resumed, after) == expected
    assert resumed.state_dict() == uninterrupted.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_examples": 0, "batch_size": 1}, "num_examples must be >= 1, got 0"),
        ({"num_examples": 5, "batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"num_examples": 5, "batch_size": 1, "seed": -1}, "seed must be >= 0, got -1"),
        ({"num_examples": 5, "batch_size": 6}, "batch_size 6 is larger than the dataset"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PromptSampler(**{"seed": 0, **kwargs})


def test_batch_larger_than_dataset_without_drop_last_is_one_short_batch() -> None:
    sampler = PromptSampler(3, 5, seed=0, drop_last=False)
    assert [sorted(b) for b in draw(sampler, 2)] == [[0, 1, 2], [0, 1, 2]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_examples": 11}, "saved with num_examples=11, this sampler has num_examples=10"),
        ({"seed": 2}, "saved with seed=2"),
        ({"batch_size": 3}, "saved with batch_size=3"),
        ({"epoch": -1}, "epoch must be an integer >= 0"),
        ({"position": 11}, r"position must be an integer in \[0, 10\]"),
    ],
)
def test_load_state_dict_refuses_a_mismatched_state(change: dict[str, int], message: str) -> None:
    sampler = PromptSampler(10, 4, seed=1)
    with pytest.raises(ValueError, match=message):
        sampler.load_state_dict({**sampler.state_dict(), **change})
    state = sampler.state_dict()
    del state["seed"]
    with pytest.raises(ValueError, match="sampler state has no 'seed'"):
        sampler.load_state_dict(state)
