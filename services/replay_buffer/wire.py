"""The buffer's wire format, by hand where protobuf's own encoder would make a Python object
per field: a put group's canonical encoding located field by field (:class:`PackedGroup`,
:func:`pack_group`), so token ids and log-probs are read as packed bytes (:func:`packed_values`),
and the tags and varints that :mod:`services.replay_buffer.logic` assembles a sampled item
from (``head + body + tail``). Everything here writes exactly what protobuf writes
(``tests/integration/buffer/test_packed_bytes.py``)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from protos import replay_buffer_pb2 as pb

WIRE_TYPE_NAMES = {0: "varint", 1: "64-bit", 2: "length-delimited", 3: "group", 5: "32-bit"}
VARINT, I64, LEN, I32 = 0, 1, 2, 5
ZERO_DOUBLE = bytes(8)


def tag(message: Descriptor, name: str, wire: int) -> bytes:
    """The one-byte tag of field ``name`` (number < 16) of ``message``."""
    number = message.fields_by_name[name].number
    assert number < 16, name
    return bytes([number << 3 | wire])


def wire_types(message: Descriptor) -> dict[int, int]:
    """Field number -> wire type of every field of ``message`` in a canonical encoding
    (repeated scalars packed, as proto3 and upb write them)."""
    fixed64 = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64,
               FieldDescriptor.TYPE_SFIXED64)  # fmt: skip
    fixed32 = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32,
               FieldDescriptor.TYPE_SFIXED32)  # fmt: skip
    delimited = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES,
                 FieldDescriptor.TYPE_MESSAGE)  # fmt: skip
    out = {}
    for f in message.fields:
        if f.is_repeated or f.type in delimited:
            out[f.number] = LEN
        else:
            out[f.number] = I64 if f.type in fixed64 else I32 if f.type in fixed32 else VARINT
    return out


GROUP_WIRE = wire_types(pb.Group.DESCRIPTOR)
GROUP_FIELD = {name: f.number for name, f in pb.Group.DESCRIPTOR.fields_by_name.items()}
TOKEN_IDS_TAG = tag(pb.Rollout.DESCRIPTOR, "token_ids", LEN)  # packed
LOGPROBS_TAG = tag(pb.Rollout.DESCRIPTOR, "logprobs", LEN)
# Tags of the SampledItem fragments (head, body, tail) and of a SampleResponse.items entry.
ITEM = pb.SampledItem.DESCRIPTOR
HEAD_TAGS = {
    GROUP_FIELD["step"]: tag(ITEM, "step", VARINT),
    GROUP_FIELD["prompt_id"]: tag(ITEM, "prompt_id", LEN),
    GROUP_FIELD["prompt_token_ids"]: tag(ITEM, "prompt_token_ids", LEN),
}
ROLLOUT_INDEX_TAG = tag(ITEM, "rollout_index", VARINT)
ROLLOUT_TAG = tag(ITEM, "rollout", LEN)
ADVANTAGE_TAG = tag(ITEM, "advantage", I64)
PAIR_INDEX_TAG = tag(ITEM, "pair_index", VARINT)
DRAW_PROBABILITY_TAG = tag(ITEM, "draw_probability", I64)
ITEM_TAG = tag(pb.SampleResponse.DESCRIPTOR, "items", LEN)
PROMPTS_TAG = bytes([pb.SampleResponse.DESCRIPTOR.fields_by_name["prompts"].number << 3 | LEN])
MAP_KEY_TAG, MAP_VALUE_TAG = bytes([1 << 3 | LEN]), bytes([2 << 3 | LEN])
GROUP_PROMPT_TOKENS_TAG = tag(pb.GroupPrompt.DESCRIPTOR, "token_ids", LEN)
ITEM_WIRE = wire_types(ITEM)


@dataclass(frozen=True)
class PackedGroup:
    """A group's canonical encoding and where its fields lie in it.

    ``data`` is ``group.SerializeToString(deterministic=True)``: the bytes its digest is
    taken over, fields in field-number order, repeated scalars packed. Ranges are
    ``(start, end)`` offsets into ``data``.

    Attributes:
        head: ``(field number, start, end)`` of the group's step, prompt_id and prompt
            token ids, each from after its tag to its end (length prefix included).
        prompt_tokens: the prompt token ids' packed values (little-endian uint32).
        rollouts: each rollout from after its tag (length prefix included).
        tokens, logprobs: each rollout's packed token ids and log-probs (float32); an
            empty range where the rollout has none.
    """

    data: bytes
    head: tuple[tuple[int, int, int], ...]
    prompt_tokens: tuple[int, int]
    rollouts: tuple[tuple[int, int], ...]
    tokens: tuple[tuple[int, int], ...]
    logprobs: tuple[tuple[int, int], ...]


def pack_group(g: pb.Group) -> PackedGroup | None:
    """``g`` serialized once, with its fields located; None if the group has a field this
    server does not know (:func:`check_known_fields` says which).
    """
    data = g.SerializeToString(deterministic=True)
    fields = walk(data, 0, len(data), GROUP_WIRE)
    if fields is None:
        return None
    head: list[tuple[int, int, int]] = []
    rollouts: list[tuple[int, int]] = []
    tokens: list[tuple[int, int]] = []
    logprobs: list[tuple[int, int]] = []
    prompt_tokens = (0, 0)
    for number, start, value, end in fields:
        if number in HEAD_TAGS:
            head.append((number, start, end))
            if number == GROUP_FIELD["prompt_token_ids"]:
                prompt_tokens = (value, end)
        elif number == GROUP_FIELD["rollouts"]:
            # token_ids and logprobs are a rollout's first fields (a field the server does not
            # know comes last: check_known_fields refuses it); nothing per field is built, as
            # allocations here set off the garbage collector's full passes (~100 ms)
            rollouts.append((start, end))
            for tag, found in ((TOKEN_IDS_TAG, tokens), (LOGPROBS_TAG, logprobs)):
                if value < end and data[value] == tag[0]:
                    length, value = read_varint(data, value + 1)
                    found.append((value, value + length))
                    value += length
                else:
                    found.append((end, end))
    return PackedGroup(
        data, tuple(head), prompt_tokens, tuple(rollouts), tuple(tokens), tuple(logprobs)
    )


def walk(
    data: bytes, start: int, end: int, wire_types: dict[int, int]
) -> list[tuple[int, int, int, int]] | None:
    """``(field number, start after the tag, value start, end)`` of each field of the
    canonical encoding ``data[start:end]``; None at a field not in ``wire_types`` with its
    wire type (an unknown field, which the encoder writes after the known ones)."""
    fields = []
    pos = start
    while pos < end:
        tag = data[pos]
        if tag >= 0x80 or wire_types.get(tag >> 3) != tag & 7:
            return None
        pos += 1
        at = value = pos
        wire = tag & 7
        if wire == LEN:
            length, value = read_varint(data, pos)
            pos = value + length
        elif wire == VARINT:
            _, pos = read_varint(data, pos)
        else:
            pos += 8 if wire == I64 else 4
        fields.append((tag >> 3, at, value, pos))
    return fields if pos == end else None


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``data[pos]`` and the offset after it."""
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def packed_values(
    packed: Sequence[PackedGroup],
    ranges: Callable[[PackedGroup], Iterable[tuple[int, int]]],
    dtype: str,
) -> np.ndarray:
    """The values in the ``ranges`` of each group's bytes, concatenated, as one array of
    ``dtype``: no Python object per value."""
    parts = []
    for p in packed:
        view = memoryview(p.data)
        parts += [view[start:end] for start, end in ranges(p)]
    return np.frombuffer(b"".join(parts), dtype=dtype)


def item_tail(pair_index: int, draw_probability: float) -> bytes:
    """``SampledItem(pair_index, draw_probability)`` serialized, as protobuf writes it (a
    field equal to its default, 0 or +0.0, left out; a negative int32 in 10 bytes)."""
    probability = struct.pack("<d", draw_probability)
    return b"".join((
        PAIR_INDEX_TAG + varint(pair_index % 2**64) if pair_index else b"",
        b"" if probability == ZERO_DOUBLE else DRAW_PROBABILITY_TAG + probability,
    ))  # fmt: skip


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint."""
    if value < 0x80:
        return bytes((value,))
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def split_item_head(head: bytes) -> tuple[bytes, bytes]:
    """A stored item head (``SampledItem(step, prompt_id, prompt_token_ids)`` serialized,
    fields in that order) cut into the head without the prompt and the
    ``SampleResponse.prompts`` map entry of its prompt (tag and length included), as
    protobuf writes them (``SampleRequest.prompts_by_group``)."""
    fields = walk(head, 0, len(head), ITEM_WIRE)
    if fields is None:  # written by this server: cannot happen short of a corrupt store
        raise ValueError("a stored item head does not parse")
    prompt_id, short_end, tokens = b"", len(head), b""
    for number, start, _, end in fields:
        if number == ITEM.fields_by_name["prompt_id"].number:
            prompt_id = head[start:end]  # its length prefix and bytes
        elif number == ITEM.fields_by_name["prompt_token_ids"].number:
            short_end, tokens = start - 1, head[start:end]  # the one-byte tag before start
    value = GROUP_PROMPT_TOKENS_TAG + tokens if tokens else b""
    entry = b"".join((MAP_KEY_TAG, prompt_id, MAP_VALUE_TAG, varint(len(value)), value))
    return head[:short_end], PROMPTS_TAG + varint(len(entry)) + entry
