"""shuffle_r1.training: batch layout, response log-probs, mini/micro-batch splits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from shuffle_r1.minibatches import (
    microbatch_cost,
    microbatch_count,
    microbatch_plans,
    microbatch_slices,
    minibatch_slices,
    pair_aligned_shards,
    positions_run,
    prompt_keys,
    rollouts_per_optimizer_step,
    token_budget_microbatches,
)
from shuffle_r1.shared_prompt import collate_shared
from shuffle_r1.training import (
    LOGPROB_FIELDS,
    TrainBatch,
    collate,
    padding_batch,
    sequence_lengths,
    token_logprobs,
    vision_filler,
)


def _covers(slices: list[slice], total: int) -> bool:
    """Contiguous, in order, exactly covering range(total)."""
    position = 0
    for s in slices:
        if s.start != position or s.stop < s.start:
            return False
        position = s.stop
    return position == total


# -- TrainBatch and collate ------------------------------------------------------------------


def test_collate_right_pads_and_masks_responses() -> None:
    batch = TrainBatch(
        prompt_token_ids=[[5, 6], [7]],
        response_token_ids=[[8, 9, 10], [11]],
        advantages=torch.tensor([0.5, -0.5]),
        old_logprobs=torch.tensor([[-1.0, -2.0, -3.0, -9.0], [-4.0, -5.0, -6.0, -9.0]]),
    )
    c = collate(batch, pad_token_id=99)
    assert c["input_ids"].tolist() == [[5, 6, 8, 9, 10], [7, 11, 99, 99, 99]]
    assert c["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert c["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 2
    assert c["response_start"].tolist() == [2, 1]
    assert c["response_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert c["advantages"].tolist() == [0.5, -0.5]
    # cut to L = 3 (the longest response) and zeroed off the responses
    assert c["old_logprobs"].tolist() == [[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]]
    assert "ref_logprobs" not in c


def test_collate_row_without_response_keeps_a_target_position() -> None:
    batch = TrainBatch([[1, 2, 3], [4]], [[], [5]], torch.tensor([0.0, 1.0]))
    c = collate(batch)
    # T = 4: one position past the longest prompt, so response token 0 always has a slot
    assert c["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0]]
    assert c["response_mask"].tolist() == [[0.0], [1.0]]


def test_padding_batch_collates_to_a_fully_masked_row() -> None:
    c = collate(padding_batch(2))
    assert c["input_ids"].shape == (2, 2)
    assert c["response_mask"].sum() == 0
    assert c["advantages"].tolist() == [0.0, 0.0]
    assert all(c[name].shape == (2, 1) for name in LOGPROB_FIELDS)


def test_collate_rejects_an_empty_batch() -> None:
    empty = TrainBatch([], [], torch.zeros(0))
    with pytest.raises(ValueError, match="empty batch"):
        collate(empty)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"response_token_ids": [[1]]}, "2 prompts, 1 responses"),
        ({"advantages": torch.zeros(3)}, r"advantages of shape \(3,\)"),
        ({"prompt_token_ids": [[1], []]}, "empty prompt"),
        ({"old_logprobs": torch.zeros(2, 1)}, r"old_logprobs must have shape \(B=2, L>=2\)"),
        (
            {"behaviour_logprobs": torch.zeros(3, 2)},
            r"behaviour_logprobs must have shape \(B=2, L>=2\), got \(3, 2\)",
        ),
    ],
)
def test_train_batch_validates_shapes(kwargs: dict, match: str) -> None:
    fields = {
        "prompt_token_ids": [[1], [2]],
        "response_token_ids": [[3, 4], [5]],
        "advantages": torch.zeros(2),
    }
    fields.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TrainBatch(**fields)


def test_select_keeps_rows_and_logprobs_together() -> None:
    batch = TrainBatch(
        [[1], [2], [3], [4]],
        [[5], [6, 7], [8], [9]],
        torch.arange(4.0),
        old_logprobs=torch.arange(8.0).view(4, 2),
    )
    part = batch.select(slice(1, 3))
    assert part.prompt_token_ids == [[2], [3]]
    assert part.advantages.tolist() == [1.0, 2.0]
    assert part.old_logprobs.tolist() == [[2.0, 3.0], [4.0, 5.0]]
    assert len(batch.select(slice(4, 4))) == 0


def _logprob_batch(rows: int, width: int, fields: tuple[str, ...] = LOGPROB_FIELDS) -> TrainBatch:
    """Rows of one-token responses; field k of row i, column j holds -(100·k + 10·i + j)."""
    values = -torch.arange(rows * width, dtype=torch.float32).view(rows, width)
    return TrainBatch(
        [[1]] * rows,
        [[2]] * rows,
        torch.zeros(rows),
        images=[],
        **{name: values - 100 * k for k, name in enumerate(LOGPROB_FIELDS) if name in fields},
    )


def test_every_logprob_field_travels_with_its_rows() -> None:
    """old, ref and behaviour log-probs alike: select (slice and index list), concat,
    with_logprobs, collate (both layouts), padding and the vision filler."""
    batch = _logprob_batch(4, 2)
    for rows, picked in ((slice(1, 3), [1, 2]), ([3, 0], [3, 0])):
        part = batch.select(rows)
        for name in LOGPROB_FIELDS:
            assert torch.equal(getattr(part, name), getattr(batch, name)[picked]), name
    wide = batch.concat(_logprob_batch(1, 3))
    for name in LOGPROB_FIELDS:
        value = getattr(wide, name)
        assert value.shape == (5, 3) and value[:4, 2].tolist() == [0.0] * 4, name
    # a field one side lacks is dropped, the others kept
    lacking = batch.concat(_logprob_batch(1, 2, ("old_logprobs", "ref_logprobs")))
    assert lacking.behaviour_logprobs is None and lacking.old_logprobs is not None
    assert batch.concat(padding_batch()).behaviour_logprobs is not None
    filler = vision_filler(SimpleNamespace(patch_size=14, merge_size=2),
                           {"vision_start": 1, "image_pad": 2, "vision_end": 3})  # fmt: skip
    assert batch.concat(filler).behaviour_logprobs is not None
    bare = TrainBatch([[1], [1]], [[2, 3], [4]], torch.zeros(2))
    behaviour = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -4.0, -9.0]])
    set_ = bare.with_logprobs(behaviour=behaviour)
    assert set_.behaviour_logprobs is behaviour and set_.old_logprobs is None
    kept = set_.with_logprobs(old=torch.zeros(2, 2))
    assert kept.behaviour_logprobs is behaviour and kept.old_logprobs is not None
    for c in (collate(set_), collate_shared(set_)):  # cut to L = 2, zeroed off the responses
        assert c["behaviour_logprobs"].tolist() == [[-1.0, -2.0], [-3.0, 0.0]]
        assert "old_logprobs" not in c


# -- token_logprobs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _manual_logprobs(model: LlamaForCausalLM, batch: TrainBatch, temperature: float) -> Tensor:
    """Float64, one unpadded sequence at a time: log_softmax(logits / T) at each target."""
    model64 = LlamaForCausalLM(model.config).double().eval()
    model64.load_state_dict(model.state_dict())
    out = torch.zeros(len(batch), batch.max_response_len, dtype=torch.float64)
    for i, (prompt, response) in enumerate(
        zip(batch.prompt_token_ids, batch.response_token_ids, strict=True)
    ):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model64(input_ids=ids).logits[0]
        logp = torch.log_softmax(logits / temperature, dim=-1)
        for j, token in enumerate(response):
            out[i, j] = logp[len(prompt) + j - 1, token]
    return out


def test_token_logprobs_equal_a_manual_float64_computation(tiny_model: LlamaForCausalLM) -> None:
    gen = torch.Generator().manual_seed(1)
    prompt_lens, response_lens = [3, 7, 1, 5], [6, 2, 4, 0]
    batch = TrainBatch(
        [torch.randint(128, (n,), generator=gen).tolist() for n in prompt_lens],
        [torch.randint(128, (n,), generator=gen).tolist() for n in response_lens],
        torch.zeros(4),
    )
    c = collate(batch)
    with torch.no_grad():
        got = token_logprobs(
            tiny_model,
            c["input_ids"],
            c["attention_mask"],
            c["position_ids"],
            c["response_start"],
            c["response_mask"],
            temperature=0.7,
        )
    want = _manual_logprobs(tiny_model, batch, temperature=0.7)
    assert got.shape == (4, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    assert (got[c["response_mask"] == 0] == 0).all()
    assert (got[c["response_mask"] == 1] < 0).all()


def test_token_logprobs_carry_gradients(tiny_model: LlamaForCausalLM) -> None:
    batch = TrainBatch([[1, 2], [3]], [[4, 5], [6]], torch.zeros(2))
    c = collate(batch)
    logp = token_logprobs(
        tiny_model,
        c["input_ids"],
        c["attention_mask"],
        None,
        c["response_start"],
        c["response_mask"],
    )
    logp.sum().backward()
    grad = tiny_model.model.embed_tokens.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    tiny_model.zero_grad(set_to_none=True)


def test_token_logprobs_reject_a_non_positive_temperature(tiny_model: LlamaForCausalLM) -> None:
    c = collate(TrainBatch([[1]], [[2]], torch.zeros(1)))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(
            tiny_model,
            c["input_ids"],
            c["attention_mask"],
            None,
            c["response_start"],
            c["response_mask"],
            temperature=0.0,
        )


# -- splits ----------------------------------------------------------------------------------


def test_rollouts_per_optimizer_step_scales_by_keep_ratio() -> None:
    assert rollouts_per_optimizer_step(128, 16, 0.5) == 1024  # the reference recipe
    assert rollouts_per_optimizer_step(128, 16, 1.0) == 2048  # GRPO: every rollout
    assert rollouts_per_optimizer_step(2, 8, 0.5) == 8
    assert rollouts_per_optimizer_step(4, 16, 0.3) == 4 * 2 * 2  # floor(0.3·8) = 2 pairs
    with pytest.raises(ValueError, match="global_batch_size"):
        rollouts_per_optimizer_step(0, 16, 0.5)
    with pytest.raises(ValueError, match="keeps no pair"):
        rollouts_per_optimizer_step(1, 4, 0.1)


def test_minibatch_slices_are_in_order_and_pair_aligned() -> None:
    assert minibatch_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert minibatch_slices(8, 8) == [slice(0, 8)]
    assert minibatch_slices(0, 4) == []
    for bad in [(9, 4), (10, 3), (10, 0)]:
        with pytest.raises(ValueError, match="even"):
            minibatch_slices(*bad)


@pytest.mark.parametrize("num_rollouts", [0, 2, 6, 10, 16, 30])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 4])
def test_pair_aligned_shards_cover_the_batch_in_whole_pairs(
    num_rollouts: int, num_shards: int
) -> None:
    shards = pair_aligned_shards(num_rollouts, num_shards)
    sizes = [s.stop - s.start for s in shards]
    assert len(shards) == num_shards and _covers(shards, num_rollouts)
    assert all(size % 2 == 0 for size in sizes)
    assert max(sizes) - min(sizes) <= 2
    assert sizes == sorted(sizes, reverse=True)


def test_pair_aligned_shards_examples_and_errors() -> None:
    assert pair_aligned_shards(6, 2) == [slice(0, 4), slice(4, 6)]
    assert pair_aligned_shards(2, 3) == [slice(0, 2), slice(2, 2), slice(2, 2)]
    with pytest.raises(ValueError, match="even"):
        pair_aligned_shards(5, 2)
    with pytest.raises(ValueError, match="num_shards"):
        pair_aligned_shards(4, 0)


def test_microbatches_give_every_rank_the_same_count() -> None:
    # a mini-batch of 6 rollouts on 2 ranks, 2 rollouts per micro-batch: 4 + 2
    shards = pair_aligned_shards(6, 2)
    count = microbatch_count([s.stop - s.start for s in shards], 2)
    assert count == 2
    assert microbatch_slices(4, 2, count) == [slice(0, 2), slice(2, 4)]
    assert microbatch_slices(2, 2, count) == [slice(0, 2), slice(2, 2)]  # one padding slot
    assert microbatch_count([0, 0], 4) == 1  # a rank always runs at least one
    assert microbatch_slices(0, 4, 1) == [slice(0, 0)]
    assert microbatch_slices(6, 4, 2) == [slice(0, 4), slice(4, 6)]
    with pytest.raises(ValueError, match="cannot hold"):
        microbatch_slices(6, 2, 2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        microbatch_count([4], 0)


@pytest.mark.parametrize("micro", [2, 4, 6])
def test_micro_batches_never_cut_a_pair(micro: int) -> None:
    for total in range(0, 32, 2):
        for ranks in (1, 2, 3):
            shards = pair_aligned_shards(total, ranks)
            count = microbatch_count([s.stop - s.start for s in shards], micro)
            for shard in shards:
                slices = microbatch_slices(shard.stop - shard.start, micro, count)
                assert len(slices) == count
                assert _covers(slices, shard.stop - shard.start)
                assert all(s.start % 2 == 0 and s.stop % 2 == 0 for s in slices)


def test_token_budget_packs_similar_lengths_and_keeps_pairs_whole() -> None:
    # pairs (by their longer row): 0 -> 100, 1 -> 20, 2 -> 90, 3 -> 30
    lengths = [100, 60, 20, 10, 80, 90, 30, 25]
    cut = token_budget_microbatches(lengths, budget=200)
    assert cut == [[0, 1], [4, 5], [6, 7, 2, 3]]  # longest first; 4 rows x 30 = 120 fit
    assert sorted(i for rows in cut for i in rows) == list(range(8))
    assert all(len(rows) * max(lengths[i] for i in rows) <= 200 for rows in cut)
    assert positions_run(lengths, cut) == 2 * 100 + 2 * 90 + 4 * 30
    # in file order, 4 rows at a time, the short pairs pay for the long ones
    assert positions_run(lengths, [[0, 1, 2, 3], [4, 5, 6, 7]]) == 4 * 100 + 4 * 90
    # a pair longer than budget/2 gets a micro-batch of its own, over the budget
    assert token_budget_microbatches([300, 10, 5, 5], budget=100) == [[0, 1], [2, 3]]
    assert token_budget_microbatches([], budget=100) == []
    with pytest.raises(ValueError, match="even"):
        token_budget_microbatches([1, 2, 3], budget=100)
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        token_budget_microbatches([1, 2], budget=0)


def test_shared_prompt_costs_and_packing_keep_a_prompts_rollouts_together() -> None:
    # prompts A (len 80) and B (len 10); rows: A+20, A+30 | B+50, B+5 | A+10, A+10
    lengths = [100, 110, 60, 15, 90, 90]
    prompts = [(0, 80), (0, 80), (1, 10), (1, 10), (0, 80), (0, 80)]
    assert microbatch_cost([0, 1, 4, 5], lengths, prompts) == 80 + 4 * 30
    assert microbatch_cost([0, 1, 2, 3], lengths, prompts) == 2 * 80 + 4 * 50
    assert microbatch_cost([0, 1, 2, 3], lengths) == 4 * 110
    assert microbatch_cost([], lengths, prompts) == 0
    # longest first would put pair B (60) before pair A' (90) only by length; by prompt, A's
    # two pairs go together, and cost one prompt between them
    cut = token_budget_microbatches(lengths, budget=200, prompts=prompts)
    assert cut == [[0, 1, 4, 5], [2, 3]]
    assert positions_run(lengths, cut, prompts) == (80 + 4 * 30) + (10 + 2 * 50)
    assert prompt_keys([[1, 2], [3], [1, 2]]) == [(0, 2), (1, 1), (0, 2)]


@pytest.mark.parametrize("budget", [0, 64, 256])
def test_microbatch_plans_give_every_rank_the_same_count(budget: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for total in range(0, 30, 2):
        lengths = torch.randint(5, 90, (total,), generator=gen).tolist()
        shards = pair_aligned_shards(total, 3)
        plans = microbatch_plans([lengths[s] for s in shards], 4, budget)
        assert len({len(plan) for plan in plans}) == 1 and len(plans[0]) >= 1
        for shard, plan in zip(shards, plans, strict=True):
            rows = [i for micro in plan for i in micro]
            assert sorted(rows) == list(range(shard.stop - shard.start))
            pairs = [micro[j : j + 2] for micro in plan for j in range(0, len(micro), 2)]
            assert all(a % 2 == 0 and b == a + 1 for a, b in pairs)  # pairs whole, adjacent
            assert all(not micro for micro in plan[sum(1 for m in plan if m) :])  # tail
            if budget == 0:  # consecutive runs, as microbatch_slices cuts them
                count = microbatch_count([s.stop - s.start for s in shards], 4)
                slices = microbatch_slices(shard.stop - shard.start, 4, count)
                assert plan == [list(range(s.start, s.stop)) for s in slices]


def test_sequence_lengths_are_collates_row_lengths() -> None:
    batch = TrainBatch(
        prompt_token_ids=[[1, 2, 3], [4]],
        response_token_ids=[[5, 6], []],
        advantages=torch.tensor([1.0, -1.0]),
    )
    assert sequence_lengths(batch) == [5, 2]  # an empty response still gets one position
    assert collate(batch)["input_ids"].shape == (2, max(sequence_lengths(batch)))


def test_select_takes_rows_in_the_order_given() -> None:
    batch = TrainBatch(
        prompt_token_ids=[[1], [2], [3], [4]],
        response_token_ids=[[10], [20, 21], [30], [40, 41, 42]],
        advantages=torch.tensor([0.1, 0.2, 0.3, 0.4]),
        old_logprobs=torch.arange(12.0).view(4, 3),
        images=[(b"a",), (), (b"c",), ()],
    )
    picked = batch.select([3, 0, 3])  # an ABS mini-batch may hold a pair twice
    assert picked.prompt_token_ids == [[4], [1], [4]]
    assert picked.response_token_ids == [[40, 41, 42], [10], [40, 41, 42]]
    assert picked.advantages.tolist() == pytest.approx([0.4, 0.1, 0.4])
    assert picked.old_logprobs is not None
    assert picked.old_logprobs.tolist() == [[9, 10, 11], [0, 1, 2], [9, 10, 11]]
    assert picked.images == [(), (b"a",), ()]
    as_slice, as_rows = batch.select(slice(1, 3)), batch.select([1, 2])
    assert as_rows.prompt_token_ids == as_slice.prompt_token_ids
    assert torch.equal(as_rows.advantages, as_slice.advantages)
    text_only = TrainBatch([[1], [2]], [[3], [4]], torch.zeros(2))
    assert text_only.select([1]).images == []
