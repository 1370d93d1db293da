"""Which prompts each training step draws: epoch-wise seeded permutations, resumable.

Epoch e visits the examples in the order ``numpy.random.default_rng((seed, e)).permutation``
(or in file order without shuffling). A batch never spans two epochs: with ``drop_last`` the
tail of an epoch shorter than a batch is skipped, without it the tail is a short batch. The
state (epoch, position) goes into the trainer's checkpoint; a sampler restored from it yields
exactly the batches the original would have yielded next.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class PromptSampler:
    """Batches of example indices in ``[0, num_examples)``.

    Raises ValueError when ``num_examples`` or ``batch_size`` is < 1, ``seed`` is negative, or
    ``drop_last`` is set and a batch is larger than the dataset (no batch could ever be drawn).
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if drop_last and batch_size > num_examples:
            raise ValueError(
                f"batch_size {batch_size} is larger than the dataset ({num_examples} examples) "
                "and drop_last is set: no batch can be drawn; lower the batch size"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # index into the current epoch's order
        self._order = self._epoch_order(0)

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one epoch (the last one short when ``drop_last`` is off)."""
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def next_batch(self) -> list[int]:
        """The next batch of example indices; moves on to the next epoch when this one ends."""
        remaining = self.num_examples - self.position
        if remaining == 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        batch = self._order[self.position : self.position + self.batch_size]
        self.position += len(batch)
        return batch.tolist()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the position and the arguments it depends on."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. Raises ValueError when the state was saved with
        different arguments (another dataset size, batch size, seed...) or is out of range."""
        for key in ("seed", "num_examples", "batch_size", "shuffle", "drop_last"):
            if key not in state:
                raise ValueError(f"sampler state has no {key!r} (keys: {sorted(state)})")
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r}, this sampler has "
                    f"{key}={getattr(self, key)!r}; resuming would change the data order"
                )
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"sampler state: epoch must be an integer >= 0, got {epoch!r}")
        if not isinstance(position, int) or not 0 <= position <= self.num_examples:
            raise ValueError(
                f"sampler state: position must be an integer in [0, {self.num_examples}], "
                f"got {position!r}"
            )
        self.epoch, self.position = epoch, position
        self._order = self._epoch_order(epoch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)
