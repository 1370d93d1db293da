"""How the learner's weights travel to the rollout engines: flat buckets (:class:`FlatWeights`).

A state dict of a few hundred tensors is published as one contiguous buffer per dtype (a
bucket, as veRL and SkyRL bucket their weight updates) and a small :class:`Layout` that says
where each tensor lies in it: its name, shape and offset; tied names (input and output
embeddings) point at one tensor. Floating tensors are cast into the bucket once, in the
engines' dtype, as the learner gathers them (``Backend.flat_state``).

Through the object store: pickled (``ray.put``), a bucket is a NumPy byte array, which
pickle protocol 5 hands to Ray out of band, so ``ray.put`` copies it once into the object
store and ``ray.get`` on the same node maps it without a copy. Unpickling gives a plain
``dict[str, Tensor]`` of views into the buckets, the contract of ``Engine.load_weights``, so
an engine loads straight from the shared buffer. The views are read-only memory of the
object store: an engine copies them into its own parameters; anyone who wants to change one
must copy it first.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Entry:
    """One tensor of a :class:`Layout`: ``numel`` elements at ``offset`` of bucket
    ``bucket``, viewed as ``shape``."""

    name: str
    bucket: int
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a state dict lies in the buckets.

    Attributes:
        dtypes: the dtype of each bucket (``"bfloat16"``, ``"float32"``, ``"int64"``...).
        sizes: elements in each bucket.
        entries: the tensors, in state-dict order, tied ones once.
        aliases: ``(name, entry name)``: a tied name and the entry it shares.
    """

    dtypes: tuple[str, ...]
    sizes: tuple[int, ...]
    entries: tuple[Entry, ...]
    aliases: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def of(
        tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
        dtype: torch.dtype,
        aliases: Iterable[tuple[str, str]] = (),
    ) -> Layout:
        """The layout of ``(name, shape, dtype)`` tensors with floating ones cast to
        ``dtype``; one bucket per resulting dtype, tensors in the order given."""
        names: list[str] = []
        sizes: list[int] = []
        entries = []
        for name, shape, own in tensors:
            target = _name(dtype if own.is_floating_point else own)
            if target not in names:
                names.append(target)
                sizes.append(0)
            b = names.index(target)
            entry = Entry(name, b, sizes[b], tuple(shape))
            sizes[b] += entry.numel
            entries.append(entry)
        return Layout(tuple(names), tuple(sizes), tuple(entries), tuple(aliases))

    def empty(self, device: torch.device | str = "cpu") -> list[Tensor]:
        """Uninitialised buckets for this layout."""
        return [
            torch.empty(n, dtype=getattr(torch, d), device=device)
            for d, n in zip(self.dtypes, self.sizes, strict=True)
        ]

    def views(self, buckets: list[Tensor]) -> dict[str, Tensor]:
        """``{name: tensor}`` viewing ``buckets``; a tied name maps to the same object."""
        out = {
            e.name: buckets[e.bucket].narrow(0, e.offset, e.numel).view(e.shape)
            for e in self.entries
        }
        for name, target in self.aliases:
            out[name] = out[target]
        return out


class FlatWeights:
    """A state dict in flat buckets (module doc): ``layout`` and one tensor per bucket, on
    CPU to go through the object store. ``ray.get`` of a put one gives ``dict[str, Tensor]``
    (:meth:`__reduce__`)."""

    def __init__(self, layout: Layout, buckets: list[Tensor]) -> None:
        self.layout = layout
        self.buckets = buckets

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buckets)

    def state_dict(self) -> dict[str, Tensor]:
        return self.layout.views(self.buckets)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # uint8 NumPy views: pickle protocol 5 sends them out of band (no copy)
        arrays = [b.contiguous().view(torch.uint8).numpy() for b in self.buckets]
        return _unflatten, (self.layout, arrays)


def pack(
    state: Mapping[str, Tensor], dtype: torch.dtype, aliases: Iterable[tuple[str, str]] = ()
) -> FlatWeights:
    """``state`` (full tensors, any device) in CPU buckets, floating tensors cast to
    ``dtype`` in the one copy each takes; names in ``aliases`` (``(name, entry name)``) are
    left out of the buckets and view their entry's tensor."""
    aliases = tuple(aliases)
    tied = {name for name, _ in aliases}
    tensors = [(k, v) for k, v in state.items() if k not in tied]
    layout = Layout.of(((k, tuple(v.shape), v.dtype) for k, v in tensors), dtype, aliases)
    buckets = layout.empty()
    for entry, (_, value) in zip(layout.entries, tensors, strict=True):
        buckets[entry.bucket].narrow(0, entry.offset, entry.numel).copy_(value.reshape(-1))
    return FlatWeights(layout, buckets)


def tied_names(state: Mapping[str, Tensor]) -> list[tuple[str, str]]:
    """``(name, first name)`` of every entry of ``state`` (a ``state_dict(keep_vars=True)``)
    that is an earlier entry's tensor: tied input/output embeddings."""
    first: dict[int, str] = {}
    tied = []
    for name, tensor in state.items():
        if id(tensor) in first:
            tied.append((name, first[id(tensor)]))
        else:
            first[id(tensor)] = name
    return tied


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _unflatten(layout: Layout, arrays: list[Any]) -> dict[str, Tensor]:
    """Unpickling a :class:`FlatWeights`: views into the (object store's) byte arrays."""
    with warnings.catch_warnings():
        # the object store's buffers are read-only (module doc); torch warns once about it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        buckets = [
            torch.from_numpy(a).view(getattr(torch, d))
            for a, d in zip(arrays, layout.dtypes, strict=True)
        ]
    return layout.views(buckets)
