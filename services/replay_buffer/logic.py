"""The buffer's algorithm glue: protobuf groups ↔ tensors, around ``shuffle_r1.algos``.

On put: GRPO advantages per group (docs/algorithm.md §1), then PTS pairs and their weights
(§2, §3.1); the result is stored as a StoredGroup whose kept rollouts are pre-encoded
SampledItem fragments. Token ids and log-probs stay packed bytes throughout: each group is
serialized once (the bytes its digest is taken over), the checks on token ids and log-probs
read those bytes with numpy, and the fragments are cut from them (``wire.PackedGroup``); no
per-token Python object is made unless a check fails and its message must name the token.
On sample: ABS over the step's pairs (§3) with a generator seeded
from the run seed and the step, and the batch is assembled from those fragments. A
serialized protobuf message may be concatenated with another (the parser merges them), so
an item's bytes are ``head + body + tail``: the group's step, prompt_id and prompt tokens;
the rollout, its index and advantage; the pair index and draw probability.

The math is the library's; nothing here re-implements it.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from google.protobuf import text_format
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from protos import replay_buffer_pb2 as pb
from services.replay_buffer.store import GroupRecord
from services.replay_buffer.wire import (
    ADVANTAGE_TAG,
    HEAD_TAGS,
    ITEM_TAG,
    ROLLOUT_INDEX_TAG,
    ROLLOUT_TAG,
    WIRE_TYPE_NAMES,
    ZERO_DOUBLE,
    PackedGroup,
    item_tail,
    pack_group,
    packed_values,
    split_item_head,
    varint,
)
from shuffle_r1.algos import (
    advantage_based_batch_shuffle,
    advantage_collapse_share,
    grpo_advantages,
    pairs_kept,
    pairwise_trajectory_sampling,
    rollout_silence_ratio,
)
from shuffle_r1.config import ALGORITHMS, AlgorithmConfig
from shuffle_r1.limits import (
    MAX_ABS_REWARD,
    MAX_COUNTER,
    MAX_LOGPROB,
    MAX_PROMPT_ID_BYTES,
    MAX_SHUFFLE_TIMES,
    RUN_ID_PATTERN,
    echo,
)


def spec_text(spec: pb.RunSpec) -> str:
    """``spec`` on one line, for error messages."""
    return "{" + text_format.MessageToString(spec, as_one_line=True) + "}"


def default_seed(run_id: str) -> int:
    """The run seed used when a RunSpec gives none: 63 bits of SHA-256 of the run id."""
    return int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:8], "little") >> 1


def step_generator(seed: int, step: int) -> torch.Generator:
    """The ABS generator of one step (§3 "seeded generator"): same (seed, step), same draw."""
    key = hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8]
    return torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)


def resolve_spec(spec: pb.RunSpec | None, defaults: AlgorithmConfig, run_id: str) -> pb.RunSpec:
    """A complete RunSpec: unset fields from ``defaults``; knobs the algorithm does not
    apply are normalised (α = 1 and S = 1 under ``grpo``, S = 1 under ``grpo+pts``), so
    specs that train the same way compare equal. ``vocab_size`` is kept as given (0 = token
    ids unchecked).

    Raises:
        ValueError: a field is out of range; the message names ``spec.<field>``.
    """
    spec = spec or pb.RunSpec()
    algorithm = spec.algorithm or defaults.name
    if algorithm not in ALGORITHMS:
        raise ValueError(f"spec.algorithm={echo(algorithm)} is not one of {list(ALGORITHMS)}")
    keep_ratio = spec.keep_ratio if spec.HasField("keep_ratio") else defaults.keep_ratio
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"spec.keep_ratio={keep_ratio} must be in (0, 1]")
    shuffle_times = spec.shuffle_times if spec.HasField("shuffle_times") else defaults.shuffle_times
    if not 1 <= shuffle_times <= MAX_SHUFFLE_TIMES:
        raise ValueError(f"spec.shuffle_times={shuffle_times} must be in [1, {MAX_SHUFFLE_TIMES}]")
    applied = AlgorithmConfig(name=algorithm, keep_ratio=keep_ratio, shuffle_times=shuffle_times)
    return pb.RunSpec(
        algorithm=algorithm,
        keep_ratio=applied.effective_keep_ratio,
        shuffle_times=applied.effective_shuffle_times,
        seed=spec.seed if spec.HasField("seed") else default_seed(run_id),
        vocab_size=spec.vocab_size,
        logprobs=spec.logprobs,
    )


def check_known_fields(message: Message, path: str) -> None:
    """Refuse fields this server does not know or whose wire type does not match.

    A protobuf parser keeps such fields aside instead of failing, which would silently
    drop data sent by another message type or a newer client.

    Raises:
        ValueError: names the field path, the field and the wire type.
    """
    for field in UnknownFieldSet(message):
        known = message.DESCRIPTOR.fields_by_number.get(field.field_number)
        wire = WIRE_TYPE_NAMES.get(field.wire_type, str(field.wire_type))
        where = f"{path}." if path else ""
        if known is None:
            raise ValueError(
                f"{where}<field {field.field_number}> is not a field of "
                f"{message.DESCRIPTOR.full_name} (wire type {wire}): another message type, "
                "or a client newer than this server?"
            )
        raise ValueError(f"{where}{known.name} has the wrong type: got wire type {wire}")


def _logprobs_in_range(packed: Sequence[PackedGroup | None]) -> bool:
    """Every log-prob of the groups is finite and <= MAX_LOGPROB (False if a group did
    not pack)."""
    complete = [p for p in packed if p is not None]
    if len(complete) != len(packed):
        return False
    values = packed_values(complete, lambda p: p.logprobs, "<f4")
    # max in float32 is exact; the comparison is in float64, as the per-value rule's
    return bool(np.isfinite(values).all()) and (
        not values.size or float(values.max()) <= MAX_LOGPROB
    )


def validate_put(request: pb.PutGroupsRequest) -> tuple[str, list[PackedGroup]]:
    """Check a PutGroups request's shape and values; return its run id and its groups
    packed (:func:`pack_group`, in request order).

    Spec-dependent rules (group size under PTS, token ids within the vocabulary) are
    :func:`check_against_spec`. Values echoed in a message are cut to 200 characters.
    Log-probs are checked with numpy on the packed bytes; only if one is out of range are
    they read one by one, to name the first.

    Raises:
        ValueError: the message names the offending field, e.g.
            ``groups[2].rollouts[5].logprobs``, and what is allowed.
    """
    check_known_fields(request, "")
    if request.HasField("spec"):
        check_known_fields(request.spec, "spec")
    if not request.groups:
        raise ValueError("groups is empty: a PutGroups request needs at least one group")
    run_id = request.groups[0].run_id
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise ValueError(
            f"groups[0].run_id={echo(run_id)} must match {RUN_ID_PATTERN.pattern} "
            "(letters, digits, '.', '_', '-'; at most 128)"
        )
    packed = [pack_group(g) for g in request.groups]
    logprobs_checked = _logprobs_in_range(packed)
    keys: set[tuple[int, str]] = set()
    for i, g in enumerate(request.groups):
        at = f"groups[{i}]"
        if packed[i] is None:  # a field of the group is unknown
            check_known_fields(g, at)
        if g.run_id != run_id:
            raise ValueError(
                f"{at}.run_id={echo(g.run_id)} differs from groups[0].run_id={run_id!r}: "
                "one request puts groups of one run"
            )
        if not 0 <= g.step < MAX_COUNTER:
            raise ValueError(f"{at}.step={g.step} must be in [0, {MAX_COUNTER})")
        if not g.prompt_id or len(g.prompt_id.encode()) > MAX_PROMPT_ID_BYTES:
            raise ValueError(
                f"{at}.prompt_id={echo(g.prompt_id)} must be 1 to {MAX_PROMPT_ID_BYTES} bytes"
            )
        if (g.step, g.prompt_id) in keys:
            raise ValueError(
                f"{at} repeats the key (step {g.step}, prompt_id {echo(g.prompt_id)}) of an "
                "earlier group of this request"
            )
        keys.add((g.step, g.prompt_id))
        if not g.prompt_token_ids:
            raise ValueError(f"{at}.prompt_token_ids is empty")
        if not g.rollouts:
            raise ValueError(f"{at}.rollouts is empty: a group needs its n rollouts")
        for k, image in enumerate(g.images):
            check_known_fields(image, f"{at}.images[{k}]")
            if image.WhichOneof("source") is None:
                raise ValueError(f"{at}.images[{k}] has neither data nor uri")
        for j, r in enumerate(g.rollouts):
            _validate_rollout(r, f"{at}.rollouts[{j}]", logprobs_checked)
    complete = [p for p in packed if p is not None]  # a group that did not pack was refused
    assert len(complete) == len(packed), "a group of known fields only did not pack"
    return run_id, complete


def _validate_rollout(r: pb.Rollout, at: str, logprobs_checked: bool) -> None:
    """``logprobs_checked``: every log-prob of the request is finite and <= MAX_LOGPROB
    (:func:`_logprobs_in_range`)."""
    check_known_fields(r, at)
    if not r.token_ids:
        raise ValueError(f"{at}.token_ids is empty: a response has at least one token")
    if not r.logprobs:  # required or forbidden by the run's spec (check_against_spec)
        pass
    elif len(r.logprobs) != len(r.token_ids):
        raise ValueError(
            f"{at}.logprobs has {len(r.logprobs)} values but token_ids has "
            f"{len(r.token_ids)}: send one log-prob per response token"
        )
    elif logprobs_checked:
        pass
    elif not math.isfinite(sum(r.logprobs)):
        bad = next(t for t, v in enumerate(r.logprobs) if not math.isfinite(v))
        raise ValueError(f"{at}.logprobs[{bad}] is {r.logprobs[bad]}; log-probs must be finite")
    elif max(r.logprobs) > MAX_LOGPROB:
        bad = next(t for t, v in enumerate(r.logprobs) if v > MAX_LOGPROB)
        raise ValueError(
            f"{at}.logprobs[{bad}] is {r.logprobs[bad]}; log-probabilities must be <= 0 "
            f"(up to {MAX_LOGPROB} of rounding): send log-probs, not probabilities or logits"
        )
    if not math.isfinite(r.reward):
        raise ValueError(f"{at}.reward is {r.reward}; rewards must be finite")
    if abs(r.reward) > MAX_ABS_REWARD:
        raise ValueError(
            f"{at}.reward is {r.reward}; rewards must be in [-{MAX_ABS_REWARD:g}, "
            f"{MAX_ABS_REWARD:g}] (shuffle_r1.limits.MAX_ABS_REWARD)"
        )
    if not 0 <= r.weight_version < MAX_COUNTER:
        raise ValueError(f"{at}.weight_version={r.weight_version} must be in [0, {MAX_COUNTER})")


def check_against_spec(
    groups: Sequence[pb.Group], packed: Sequence[PackedGroup], spec: pb.RunSpec
) -> None:
    """The rules that depend on the run's spec: under PTS every group must pair, n even and
    floor(α·n/2) >= 1 (§2.3); with ``spec.vocab_size`` > 0 every prompt and response token
    id must be below it; every rollout carries its log-probs under ``LOGPROBS_REQUIRED``
    and none under ``LOGPROBS_OMITTED``. The token ids are checked with numpy on the
    groups' packed bytes (``packed``, from :func:`validate_put`); only if one is outside
    the vocabulary are they read one by one, to name the first.

    Raises:
        ValueError: names ``groups[i].rollouts`` with n and the run's keep ratio, the
            token list, the offending index and id, and the vocabulary size, or the
            rollout whose log-probs the spec requires or forbids.
    """
    vocab = spec.vocab_size
    if vocab and _ids_below(packed, vocab):
        vocab = 0  # checked
    required = spec.logprobs == pb.LOGPROBS_REQUIRED
    for i, g in enumerate(groups):
        for j, r in enumerate(g.rollouts):
            if bool(r.logprobs) != required:
                raise ValueError(
                    f"groups[{i}].rollouts[{j}].logprobs "
                    + (
                        "is empty: this run's spec.logprobs is LOGPROBS_REQUIRED (one "
                        "log-prob per response token)"
                        if required
                        else f"has {len(r.logprobs)} values: this run's spec.logprobs is "
                        "LOGPROBS_OMITTED (send none)"
                    )
                )
        if spec.algorithm != "grpo":
            try:
                pairs_kept(len(g.rollouts), spec.keep_ratio)
            except ValueError as exc:
                raise ValueError(
                    f"groups[{i}].rollouts has {len(g.rollouts)} rollouts, which PTS cannot "
                    f"pair under {spec.algorithm} with keep_ratio {spec.keep_ratio}: {exc}"
                ) from exc
        if vocab:
            _check_vocab(g.prompt_token_ids, vocab, f"groups[{i}].prompt_token_ids")
            for j, r in enumerate(g.rollouts):
                _check_vocab(r.token_ids, vocab, f"groups[{i}].rollouts[{j}].token_ids")


def _ids_below(packed: Sequence[PackedGroup], vocab: int) -> bool:
    """Every prompt and response token id of the groups is below ``vocab``."""
    ids = packed_values(packed, lambda p: (p.prompt_tokens, *p.tokens), "<u4")
    return not ids.size or int(ids.max()) < vocab


def _check_vocab(ids: Sequence[int], vocab: int, at: str) -> None:
    if max(ids) >= vocab:
        bad = next(t for t, v in enumerate(ids) if v >= vocab)
        raise ValueError(
            f"{at}[{bad}] is {ids[bad]}, outside the vocabulary [0, {vocab}) of the run "
            "(spec.vocab_size): a token id of another tokenizer?"
        )


def prepare_groups(
    groups: Sequence[pb.Group],
    spec: pb.RunSpec,
    packed: Sequence[PackedGroup] | None = None,
) -> list[GroupRecord]:
    """GRPO advantages and PTS for validated groups; one :class:`GroupRecord` each, in order.

    Groups are batched by size n for the library calls. Under ``grpo`` every rollout is
    kept in order; under PTS the kept rollouts are stored in pair order (pair k = rollouts
    2k (high) and 2k+1 (low)) with the pair weights W = |A_high| + |A_low| (§3.1).
    Advantages are computed in float64 from the rewards as put. ``packed``: the groups as
    :func:`validate_put` packed them (packed here if None).
    """
    if packed is None:
        packed = [p for p in map(pack_group, groups) if p is not None]
        if len(packed) != len(groups):
            raise ValueError("a group has fields this server does not know: validate_put")
    by_size: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_size.setdefault(len(g.rollouts), []).append(i)
    records: list[GroupRecord | None] = [None] * len(groups)
    use_pts = spec.algorithm != "grpo"
    for n, members in by_size.items():
        rewards = torch.tensor(
            [[r.reward for r in groups[i].rollouts] for i in members], dtype=torch.float64
        )
        advantages = grpo_advantages(rewards)
        if use_pts:
            selection = pairwise_trajectory_sampling(advantages, spec.keep_ratio)
            kept_rows = selection.pairs.flatten(1).tolist()
            weight_rows = selection.weights.tolist()
        else:
            kept_rows = [list(range(n))] * len(members)
            weight_rows = [[]] * len(members)
        for row, i in enumerate(members):
            records[i] = _record(
                groups[i], packed[i], advantages[row].tolist(), kept_rows[row],
                weight_rows[row], use_pts,
            )  # fmt: skip
    return [r for r in records if r is not None]


def _record(
    g: pb.Group,
    packed: PackedGroup,
    advantages: list[float],
    kept: list[int],
    weights: list[float],
    pts: bool,
) -> GroupRecord:
    """The group's record. Its SampledItem fragments are cut from the group's packed bytes:
    ``head`` is ``SampledItem(step, prompt_id, prompt_token_ids)`` and each body
    ``SampledItem(rollout_index, rollout, advantage)``, serialized, byte for byte (the
    fields re-tagged, defaults left out as protobuf leaves them out)."""
    n = len(g.rollouts)
    data = packed.data
    head = b"".join(HEAD_TAGS[number] + data[start:end] for number, start, end in packed.head)
    bodies = []
    for j in kept:
        start, end = packed.rollouts[j]
        advantage = struct.pack("<d", advantages[j])
        bodies.append(
            b"".join((
                ROLLOUT_INDEX_TAG + varint(j) if j else b"",
                ROLLOUT_TAG, data[start:end],
                b"" if advantage == ZERO_DOUBLE else ADVANTAGE_TAG + advantage,
            ))
        )  # fmt: skip
    stored = pb.StoredGroup(
        item_head=head,
        item_bodies=bodies,
        advantages=[advantages[j] for j in kept],
        truncated=[g.rollouts[j].truncated for j in kept],
        pair_weights=weights,
        images=g.images,
    )
    summary = pb.GroupSummary(
        advantages=advantages,
        truncated=[r.truncated for r in g.rollouts],
        kept=kept,
        pairs_kept=len(weights),
        pairs_dropped=n // 2 - len(weights) if pts else 0,
    )
    return GroupRecord(
        step=g.step,
        prompt_id=g.prompt_id,
        digest=hashlib.sha256(data).digest(),  # of the group as put
        oldest_weight_version=min(r.weight_version for r in g.rollouts),
        pairs_kept=summary.pairs_kept,
        pairs_dropped=summary.pairs_dropped,
        payload=stored.SerializeToString(),
        summary=summary.SerializeToString(),
        rollouts_kept=len(kept),
        advantages=tuple(advantages),
    )


@dataclass(frozen=True)
class DrawnBatch:
    """A step's batch, ready to send.

    Attributes:
        encoded: byte strings whose concatenation encodes the ``SampleResponse.items``
            entries (tags and lengths included), in draw order; send it after a serialized
            SampleResponse holding the other fields.
        prompts: ``SampleResponse.prompts`` entries (tags and lengths included), one per
            group with an item in the batch, under ``prompts_by_group``; else empty.
        item_count: items in the batch.
        groups: the StoredGroups the draw was over, in ascending prompt_id order.
        pairs_total: P (0 under ``grpo``).
        shortfall, skipped, round_sizes: as :class:`shuffle_r1.algos.ShuffleResult`
            (``round_sizes`` empty under ``grpo``).
        rollout_silence_ratio, advantage_collapse_share: over the items (§5); NaN if none.
    """

    encoded: list[bytes]
    item_count: int
    groups: list[pb.StoredGroup]
    pairs_total: int
    shortfall: int
    skipped: bool
    rollout_silence_ratio: float
    advantage_collapse_share: float
    round_sizes: tuple[int, ...] = ()
    prompts: tuple[bytes, ...] = ()


def draw_batch(
    payloads: Sequence[bytes],
    spec: pb.RunSpec,
    step: int,
    collapse_tau: float,
    prompts_by_group: bool = False,
) -> DrawnBatch:
    """The training batch of ``step`` from its StoredGroup payloads (ascending prompt_id).

    PTS runs (``grpo+pts``, ``shuffle_r1``): the step's pairs are flattened group by group,
    pairs in PTS order; ABS draws them with ``spec.shuffle_times`` rounds (S = 1 under
    ``grpo+pts``: every pair, in order) using :func:`step_generator` (``spec.seed``,
    ``step``). Each drawn pair gives two adjacent items (high advantage first) whose
    ``draw_probability`` is Φ of the pair. ``grpo``: every rollout of every group in order,
    each with draw_probability 1/N and pair_index -1.

    ``prompts_by_group`` (``SampleRequest.prompts_by_group``): the items leave out
    ``prompt_token_ids`` and :attr:`DrawnBatch.prompts` holds each drawn group's prompt once,
    encoded as ``SampleResponse.prompts`` entries (``wire.split_item_head``).
    """
    groups = [pb.StoredGroup.FromString(p) for p in payloads]
    bodies = [list(g.item_bodies) for g in groups]  # one copy each, reused by recurring pairs
    # (group, kept rollout, tail) of each item in draw order
    picks: list[tuple[int, int, bytes]] = []
    if spec.algorithm == "grpo":
        total = sum(len(b) for b in bodies)
        tail_bytes = item_tail(-1, 1.0 / max(total, 1))
        picks = [(g, j, tail_bytes) for g, b in enumerate(bodies) for j in range(len(b))]
        pairs_total, shortfall, skipped = 0, 0, total == 0
        round_sizes: tuple[int, ...] = ()
    else:
        owner = [(g, k) for g, group in enumerate(groups) for k in range(len(group.pair_weights))]
        weights = torch.tensor([w for g in groups for w in g.pair_weights], dtype=torch.float64)
        drawn = advantage_based_batch_shuffle(
            weights, spec.shuffle_times, step_generator(spec.seed, step)
        )
        tails: dict[tuple[int, float], bytes] = {}  # a pair recurs across the rounds
        for p, phi in zip(drawn.indices.tolist(), drawn.draw_probabilities.tolist(), strict=True):
            g, k = owner[p]
            tail_bytes = tails.get((p, phi)) or tails.setdefault((p, phi), item_tail(p, phi))
            picks += ((g, 2 * k, tail_bytes), (g, 2 * k + 1, tail_bytes))
        pairs_total, shortfall, skipped = len(owner), drawn.shortfall, drawn.skipped
        round_sizes = drawn.round_sizes
    heads = [g.item_head for g in groups]
    prompts: tuple[bytes, ...] = ()
    if prompts_by_group:
        drawn_groups = sorted({g for g, _, _ in picks})
        cut = {g: split_item_head(heads[g]) for g in drawn_groups}
        heads = [cut[g][0] if g in cut else b"" for g in range(len(groups))]
        prompts = tuple(cut[g][1] for g in drawn_groups)
    group_advantages = [list(g.advantages) for g in groups]
    group_truncated = [list(g.truncated) for g in groups]
    encoded: list[bytes] = []
    prefixes: dict[int, bytes] = {}  # item size -> its tag and length
    for g, j, tail_bytes in picks:
        head, body = heads[g], bodies[g][j]
        size = len(head) + len(body) + len(tail_bytes)
        prefix = prefixes.get(size) or prefixes.setdefault(size, ITEM_TAG + varint(size))
        encoded += (prefix, head, body, tail_bytes)
    advantages = torch.tensor([group_advantages[g][j] for g, j, _ in picks], dtype=torch.float64)
    truncated = torch.tensor([group_truncated[g][j] for g, j, _ in picks], dtype=torch.bool)
    return DrawnBatch(
        encoded=encoded,
        item_count=len(picks),
        groups=groups,
        pairs_total=pairs_total,
        shortfall=shortfall,
        skipped=skipped,
        rollout_silence_ratio=rollout_silence_ratio(advantages, truncated),
        advantage_collapse_share=advantage_collapse_share(advantages, collapse_tau),
        round_sizes=round_sizes,
        prompts=prompts,
    )
