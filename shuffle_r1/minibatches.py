"""How a training batch is cut (pure arithmetic on row indices, docs/algorithm.md §3.4):
into optimizer mini-batches of :func:`rollouts_per_optimizer_step` rollouts
(:func:`minibatch_slices`, or :func:`abs_minibatch_rows` over the ABS rounds), each into
contiguous pair-aligned shards, one per rank (:func:`pair_aligned_shards`), each shard into
the same number of micro-batches on every rank (:func:`microbatch_plans`: runs of
``learner.micro_batch_size`` rollouts, :func:`microbatch_count` and :func:`microbatch_slices`,
or length-sorted ones of at most ``learner.micro_batch_tokens`` padded tokens,
:func:`token_budget_microbatches`; the short ranks pad with ``training.padding_batch``).
Both rollouts of a PTS pair always stay in the same mini-batch, shard and micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shuffle_r1.algos import pairs_kept
from shuffle_r1.config import ABS_MINIBATCH_ORDERS


def rollouts_per_optimizer_step(global_batch_size: int, n: int, keep_ratio: float) -> int:
    """Rollouts in one optimizer mini-batch: ``global_batch_size · 2·floor(α·n/2)``.

    ``global_batch_size`` prompts per optimizer step as GRPO counts them, ``n`` rollouts per
    prompt, α = ``keep_ratio`` (1 for plain GRPO). PTS keeps ``2·floor(α·n/2)`` = α·n
    rollouts of each group, so the mini-batch shrinks by α and a training step makes as
    many optimizer steps as GRPO's (docs/algorithm.md §2). Reference: 128 · 16 · 0.5 = 1024.

    Raises:
        ValueError: ``global_batch_size`` < 1, or ``n`` / ``keep_ratio`` invalid for PTS.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1 prompt, got {global_batch_size}")
    return global_batch_size * 2 * pairs_kept(n, keep_ratio)


def _check_even(name: str, value: int, minimum: int) -> None:
    if value < minimum or value % 2:
        raise ValueError(
            f"{name} must be an even number >= {minimum} so both rollouts of a pair stay "
            f"together, got {value}"
        )


def minibatch_slices(num_rollouts: int, rollouts_per_minibatch: int) -> list[slice]:
    """Consecutive optimizer mini-batches of ``rollouts_per_minibatch`` rollouts (§3.4).

    The last one is shorter when ``num_rollouts`` is not a multiple (an ABS shortfall).
    Both sizes are even, so no pair is cut.

    Raises:
        ValueError: ``num_rollouts`` is odd or negative, or ``rollouts_per_minibatch`` is
            not an even number >= 2.
    """
    _check_even("num_rollouts", num_rollouts, 0)
    _check_even("rollouts_per_minibatch", rollouts_per_minibatch, 2)
    return [
        slice(start, min(start + rollouts_per_minibatch, num_rollouts))
        for start in range(0, num_rollouts, rollouts_per_minibatch)
    ]


def abs_minibatch_rows(
    round_sizes: Sequence[int], rollouts_per_minibatch: int, order: str = "interleaved"
) -> list[list[int]]:
    """The rollout rows of each optimizer mini-batch of an ABS batch (docs/algorithm.md §3.4).

    The batch holds the drawn pairs round after round (``round_sizes[r]`` pairs in round
    r, each pair two adjacent rollouts). It makes ``K = ceil(2·D / rollouts_per_minibatch)``
    optimizer steps, D = ``sum(round_sizes)``, whichever the order:

    - ``"sequential"``: mini-batch k is rollouts [k·M, (k+1)·M) of the batch, M =
      ``rollouts_per_minibatch`` (:func:`minibatch_slices`): step k gets whole rounds.
    - ``"interleaved"`` (the upstream layout): every round is cut into K contiguous parts and
      mini-batch k is part k of every round, rounds in order. Upstream (Shuffle-R1's code
      on verl, 8 data-parallel ranks, S = 8) hands each rank one round as its chunk and
      each optimizer step takes the next slice of every rank's chunk, so step k trains on
      positions [k·T/K, (k+1)·T/K) of every round and the first step holds each round's
      first (highest-Φ) draws. Parts differ by at most one pair: round r's ``T_r mod K``
      longer parts go to the mini-batches after those the previous rounds lengthened, so
      mini-batch sizes also differ by at most one pair. When K divides every ``T_r`` this
      is exactly the upstream layout.

    With one round (S = 1) both orders keep the draw order; they cut at the same places
    when ``rollouts_per_minibatch`` divides the batch (otherwise ``interleaved`` makes K
    near-equal parts, ``sequential`` full ones and a short last one). The trainer uses
    ``sequential`` for ``grpo+pts``.

    Args:
        round_sizes: pairs per round, as :class:`~shuffle_r1.algos.ShuffleResult` gives them.
        rollouts_per_minibatch: M, an even number >= 2.
        order: ``"interleaved"`` or ``"sequential"``.

    Returns:
        K lists of row indices into the batch, both rows of a pair always in the same list,
        none empty.

    Raises:
        ValueError: an unknown order, a negative round size or an invalid M.
    """
    if order not in ABS_MINIBATCH_ORDERS:
        raise ValueError(f"order must be one of {ABS_MINIBATCH_ORDERS}, got {order!r}")
    if any(t < 0 for t in round_sizes):
        raise ValueError(f"round sizes must be >= 0, got {list(round_sizes)}")
    _check_even("rollouts_per_minibatch", rollouts_per_minibatch, 2)
    total = 2 * sum(round_sizes)
    if order == "sequential":
        return [
            list(range(s.start, s.stop)) for s in minibatch_slices(total, rollouts_per_minibatch)
        ]
    count = math.ceil(total / rollouts_per_minibatch)
    minibatches: list[list[int]] = [[] for _ in range(count)]
    first_pair, cursor = 0, 0  # cursor: the mini-batch that gets the next longer part
    for size in round_sizes:
        base, extra = divmod(size, count) if count else (0, 0)
        longer = {(cursor + i) % count for i in range(extra)}
        cursor = (cursor + extra) % count if count else 0
        pair = first_pair
        for k in range(count):
            part = base + (k in longer)
            minibatches[k].extend(range(2 * pair, 2 * (pair + part)))
            pair += part
        first_pair += size
    return [rows for rows in minibatches if rows]


def minibatch_pair_stats(
    pair_indices: Sequence[int], minibatches: Sequence[Sequence[int]]
) -> dict[str, float]:
    """What each optimizer step of an ABS batch rests on (docs/algorithm.md §3).

    Args:
        pair_indices: the batch's rollouts' pair index (``SampledItem.pair_index``), one
            per row.
        minibatches: rows of each optimizer mini-batch (:func:`abs_minibatch_rows`).

    Returns:
        ``minibatches`` (K); ``pairs_per_minibatch`` (drawn pairs, repeats counted) and
        ``distinct_pairs_per_minibatch``, means over the K steps; ``max_multiplicity``, the
        most times one pair recurs within one step; ``distinct_pairs``, over the whole
        batch. Empty input gives zeros.
    """
    per_step, distinct, most = [], [], 0
    for rows in minibatches:
        counts: dict[int, int] = {}
        for row in rows[::2]:  # a pair is two adjacent rows
            counts[pair_indices[row]] = counts.get(pair_indices[row], 0) + 1
        per_step.append(sum(counts.values()))
        distinct.append(len(counts))
        most = max([most, *counts.values()])
    k = len(per_step)
    return {
        "minibatches": float(k),
        "pairs_per_minibatch": sum(per_step) / k if k else 0.0,
        "distinct_pairs_per_minibatch": sum(distinct) / k if k else 0.0,
        "max_multiplicity": float(most),
        "distinct_pairs": float(len(set(pair_indices))),
    }


def pair_aligned_shards(num_rollouts: int, num_shards: int) -> list[slice]:
    """Cut ``num_rollouts`` rollouts into ``num_shards`` contiguous shards of whole pairs.

    Shard sizes differ by at most one pair; the first shards get the extra pairs. A shard
    may be empty (fewer pairs than shards).

    Raises:
        ValueError: ``num_rollouts`` is odd or negative, or ``num_shards`` < 1.
    """
    _check_even("num_rollouts", num_rollouts, 0)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    per, extra = divmod(num_rollouts // 2, num_shards)
    slices, start = [], 0
    for rank in range(num_shards):
        size = 2 * (per + (rank < extra))
        slices.append(slice(start, start + size))
        start += size
    return slices


def microbatch_count(shard_sizes: list[int], micro_batch_size: int) -> int:
    """Micro-batches every rank runs for shards of ``shard_sizes`` rollouts:
    ``max(1, max_r ceil(shard_sizes[r] / micro_batch_size))``.

    The ranks of a sharded model (FSDP2, ZeRO-3) must run the same number of forwards and
    backwards, since each one all-gathers parameters; a rank with a shorter shard pads with
    empty micro-batches (:func:`microbatch_slices`, :func:`padding_batch`).

    Raises:
        ValueError: ``micro_batch_size`` < 1.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return max([1, *(math.ceil(size / micro_batch_size) for size in shard_sizes)])


def microbatch_slices(num_rollouts: int, micro_batch_size: int, count: int) -> list[slice]:
    """Cut a rank's shard of ``num_rollouts`` rollouts into ``count`` consecutive micro-batches
    of at most ``micro_batch_size`` rollouts; those past the end are empty slices.

    With ``micro_batch_size`` even (as the config requires under PTS) a pair is never cut.

    Raises:
        ValueError: ``count`` micro-batches cannot hold the shard, or a size is < 1.
    """
    if micro_batch_size < 1 or count < 1:
        raise ValueError(
            f"micro_batch_size and count must be >= 1, got {micro_batch_size}, {count}"
        )
    if num_rollouts > micro_batch_size * count:
        raise ValueError(
            f"{count} micro-batches of {micro_batch_size} cannot hold {num_rollouts} rollouts"
        )
    return [
        slice(
            min(i * micro_batch_size, num_rollouts), min((i + 1) * micro_batch_size, num_rollouts)
        )
        for i in range(count)
    ]


def microbatch_cost(
    rows: Sequence[int], lengths: Sequence[int], prompts: Sequence[tuple[int, int]] | None = None
) -> int:
    """Token positions a micro-batch of ``rows`` runs (0 for none).

    Full rows (``training.collate``, right padding): ``|rows| · max lengths[rows]``. With
    ``prompts`` (each row's ``(prompt key, prompt length)``; the shared-prompt layout of
    ``shuffle_r1.shared_prompt``): ``distinct prompts · longest prompt + |rows| · longest
    response``, a response being ``lengths[i] - prompt length``.
    """
    if not rows:
        return 0
    if prompts is None:
        return len(rows) * max(lengths[i] for i in rows)
    distinct = {prompts[i][0] for i in rows}
    longest_prompt = max(prompts[i][1] for i in rows)
    longest_response = max(lengths[i] - prompts[i][1] for i in rows)
    return len(distinct) * longest_prompt + len(rows) * longest_response


def token_budget_microbatches(
    lengths: Sequence[int], budget: int, prompts: Sequence[tuple[int, int]] | None = None
) -> list[list[int]]:
    """Cut a shard into micro-batches of at most ``budget`` token positions
    (:func:`microbatch_cost`), pairs whole: verl's dynamic batch size (``use_dynamic_bsz``).

    Pairs (rows 2k, 2k+1) are sorted longest first (by their longer row; stable) and packed
    greedily: a pair joins the current micro-batch while its cost stays within ``budget``,
    else starts the next. So rows of similar length share a micro-batch and short rollouts
    stop paying for long ones. With ``prompts`` (the shared-prompt layout) the pairs of one
    prompt are kept next to each other, prompts ordered by their longest pair, so a prompt
    runs in as few micro-batches as the budget allows. A pair over the budget alone gets a
    micro-batch of its own.

    Args:
        lengths: each row's sequence length, prompt + response tokens (``(B,)``, B even).
        budget: token positions per micro-batch, >= 1.
        prompts: each row's ``(prompt key, prompt length)``, or None for full rows.

    Returns:
        Row indices of each micro-batch, in packing order; each row exactly once, both rows
        of a pair in the same list. Empty for an empty shard.

    Raises:
        ValueError: an odd number of rows, or ``budget`` < 1.
    """
    _check_even("len(lengths)", len(lengths), 0)
    if budget < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1, got {budget}")
    pair_len = [max(lengths[2 * k], lengths[2 * k + 1]) for k in range(len(lengths) // 2)]
    order = sorted(range(len(pair_len)), key=lambda k: -pair_len[k])
    if prompts is not None:
        first: dict[int, int] = {}  # prompt key -> rank of its longest pair
        for rank, k in enumerate(order):
            first.setdefault(prompts[2 * k][0], rank)
        order.sort(key=lambda k: first[prompts[2 * k][0]])  # stable: longest first within
    out: list[list[int]] = []
    for k in order:
        if out and microbatch_cost([*out[-1], 2 * k, 2 * k + 1], lengths, prompts) <= budget:
            out[-1].extend((2 * k, 2 * k + 1))
        else:
            out.append([2 * k, 2 * k + 1])
    return out


def microbatch_plans(
    shard_lengths: Sequence[Sequence[int]],
    micro_batch_size: int,
    micro_batch_tokens: int = 0,
    shard_prompts: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> list[list[list[int]]]:
    """Every rank's micro-batches, as row indices into its shard, padded with empty lists so
    that every rank runs the same number (the most any rank needs; at least one).

    ``micro_batch_tokens`` > 0 cuts each shard with :func:`token_budget_microbatches` (with
    ``shard_prompts[r]``, the shared-prompt layout's costs, when given), else into
    consecutive runs of ``micro_batch_size`` rows (:func:`microbatch_slices`).

    Args:
        shard_lengths: per rank, each row's prompt + response length.

    Raises:
        ValueError: a size < 1 or an odd shard under the token budget.
    """
    if micro_batch_tokens > 0:
        cuts = [
            token_budget_microbatches(
                lengths, micro_batch_tokens, None if shard_prompts is None else shard_prompts[r]
            )
            for r, lengths in enumerate(shard_lengths)
        ]
    else:
        count = microbatch_count([len(x) for x in shard_lengths], micro_batch_size)
        cuts = [
            [
                list(range(s.start, s.stop))
                for s in microbatch_slices(len(x), micro_batch_size, count)
            ]
            for x in shard_lengths
        ]
    real = [[rows for rows in cut if rows] for cut in cuts]
    count = max([1, *(len(rows) for rows in real)])
    return [rows + [[] for _ in range(count - len(rows))] for rows in real]


def positions_run(
    lengths: Sequence[int],
    plan: Sequence[Sequence[int]],
    prompts: Sequence[tuple[int, int]] | None = None,
) -> int:
    """Token positions a rank's ``plan`` runs, padding included: the sum of
    :func:`microbatch_cost` (padding micro-batches, empty lists, count 0 here; they run one
    token each)."""
    return sum(microbatch_cost(rows, lengths, prompts) for rows in plan)


def prompt_keys(prompt_token_ids: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Each row's ``(prompt key, prompt length)``: equal prompts get the same key (the index
    of their first row), the shared-prompt layout's cost input (:func:`microbatch_cost`)."""
    seen: dict[tuple[int, ...], int] = {}
    return [(seen.setdefault(tuple(p), i), len(p)) for i, p in enumerate(prompt_token_ids)]
