"""services/trainer/records.py: a step's completions and scores into protobuf groups, and a
sampled batch back into the learner's TrainBatch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from protos import replay_buffer_pb2 as pb
from services.trainer.records import step_groups, train_batch
from shuffle_r1.data import Example
from shuffle_r1.data.splits import Prompt


def test_groups_hold_each_prompts_n_rollouts_with_their_scores() -> None:
    prompts = [
        Prompt(Example(uid="a", problem="1+1", answer="2"), [5, 6]),
        Prompt(Example(uid="b", problem="2+2", answer="4"), [7], (b"png",)),
    ]
    completions = [
        SimpleNamespace(token_ids=[i], logprobs=[-0.5], weight_version=3,
                        finish_reason="length" if i == 2 else "stop")
        for i in range(4)
    ]  # fmt: skip
    scores = [SimpleNamespace(reward=float(i)) for i in range(4)]
    groups = step_groups("run", 7, prompts, completions, scores, n=2)
    assert [(g.prompt_id, g.step, g.run_id, g.answer) for g in groups] == [
        ("a", 7, "run", "2"),
        ("b", 7, "run", "4"),
    ]
    assert [[r.reward for r in g.rollouts] for g in groups] == [[0.0, 1.0], [2.0, 3.0]]
    assert [r.truncated for r in groups[1].rollouts] == [True, False]
    assert list(groups[0].prompt_token_ids) == [5, 6] and not groups[0].images
    assert [i.data for i in groups[1].images] == [b"png"]
    assert [list(r.logprobs) for r in groups[0].rollouts] == [[-0.5], [-0.5]]
    lean = step_groups("run", 7, prompts, completions, scores, n=2, logprobs=False)
    assert all(not r.logprobs for g in lean for r in g.rollouts)  # RunSpec LOGPROBS_OMITTED
    assert [[list(r.token_ids) for r in g.rollouts] for g in lean] == [
        [list(r.token_ids) for r in g.rollouts] for g in groups
    ]
    with pytest.raises(ValueError):  # a score short: zip(strict=True)
        step_groups("run", 7, prompts, completions, scores[:3], n=2)


def test_train_batch_keeps_the_training_order_and_images() -> None:
    sample = pb.SampleResponse()
    for prompt_id, tokens, advantage in (("b", [9], 1.0), ("a", [8, 8], -1.0), ("b", [7], 0.5)):
        sample.items.add(prompt_id=prompt_id, prompt_token_ids=[1, 2], advantage=advantage,
                         rollout=pb.Rollout(token_ids=tokens))  # fmt: skip
    sample.images["b"].images.add(data=b"img")
    batch, images = train_batch(sample)
    assert batch.response_token_ids == [[9], [8, 8], [7]]
    assert batch.advantages.tolist() == [1.0, -1.0, 0.5]
    assert batch.images == [(b"img",), (), (b"img",)] and images == 1
    text_only = pb.SampleResponse()
    text_only.items.add(prompt_id="a", prompt_token_ids=[1], rollout=pb.Rollout(token_ids=[2]))
    assert train_batch(text_only)[0].images == []


def test_an_image_by_uri_is_refused_with_its_group() -> None:
    sample = pb.SampleResponse()
    sample.items.add(prompt_id="g", prompt_token_ids=[1], rollout=pb.Rollout(token_ids=[2]))
    sample.images["g"].images.add(uri="s3://bucket/x.png")
    with pytest.raises(ValueError, match=r"group 'g'.*by URI"):
        train_batch(sample)


def test_train_batch_takes_the_sampling_logprobs_as_behaviour_logprobs() -> None:
    """Off-policy training (docs/algorithm.md §4): each item's stored sampling log-probs,
    right-padded with 0 to the longest response; not read unless asked for."""
    sample = pb.SampleResponse()
    for tokens, logprobs in (([9, 9], [-0.5, -1.5]), ([8], [-0.25]), ([7, 7, 7], [-1, -2, -3])):
        sample.items.add(prompt_id="a", prompt_token_ids=[1],
                         rollout=pb.Rollout(token_ids=tokens, logprobs=logprobs))  # fmt: skip
    batch, _ = train_batch(sample, behaviour=True)
    assert batch.behaviour_logprobs is not None
    assert batch.behaviour_logprobs.dtype == torch.float32
    assert batch.behaviour_logprobs.tolist() == [
        [-0.5, -1.5, 0.0],
        [-0.25, 0.0, 0.0],
        [-1.0, -2.0, -3.0],
    ]
    assert train_batch(sample)[0].behaviour_logprobs is None


def test_train_batch_refuses_logprobs_that_do_not_match_the_tokens() -> None:
    sample = pb.SampleResponse()
    sample.items.add(prompt_id="a", prompt_token_ids=[1],
                     rollout=pb.Rollout(token_ids=[2], logprobs=[-0.5]))  # fmt: skip
    sample.items.add(prompt_id="g7", step=3, rollout_index=5, prompt_token_ids=[1],
                     rollout=pb.Rollout(token_ids=[2, 3]))  # fmt: skip  # LOGPROBS_OMITTED
    with pytest.raises(ValueError, match=r"group 'g7' \(step 3, rollout 5\): 0 sampling log-probs "
                       r"for 2 response tokens.*LOGPROBS_REQUIRED"):  # fmt: skip
        train_batch(sample, behaviour=True)
    assert train_batch(sample)[0].behaviour_logprobs is None  # on-policy: not needed
