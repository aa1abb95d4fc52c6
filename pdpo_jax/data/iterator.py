"""Epochs of batches split across hosts, deterministic per (seed, epoch) and resumable.

Each step takes `batch_size` consecutive entries of the epoch's order (a permutation seeded by
(seed, epoch), or the identity without shuffling); host p of P gets entries
[p * batch_size / P, (p + 1) * batch_size / P) of that global batch, the contiguous slice that
`jax.make_array_from_process_local_data` expects on a batch-sharded axis. Without
`drop_remainder` the last global batch is filled with `None` entries marked invalid, so every item
appears exactly once per epoch across hosts; with it, the incomplete last batch is left out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class HostBatch(Generic[T]):
    items: tuple[T | None, ...]  # this host's rows; None where padded
    valid: np.ndarray  # bool [rows]
    epoch: int
    step: int
    steps_per_epoch: int

    @property
    def next_position(self) -> tuple[int, int]:
        """The (epoch, step) to resume from after this batch."""
        if self.step + 1 < self.steps_per_epoch:
            return self.epoch, self.step + 1
        return self.epoch + 1, 0


class BatchIterator(Generic[T]):
    def __init__(
        self,
        items: Sequence[T],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        drop_remainder: bool = False,
        start: tuple[int, int] = (0, 0),
    ):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of process_count {process_count}")
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.drop_remainder = drop_remainder
        self.rows_per_host = batch_size // process_count
        full, rest = divmod(len(items), batch_size)
        self.steps_per_epoch = full + (1 if rest and not drop_remainder else 0)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(items)} items make no batch of {batch_size}" + (" with drop_remainder" if drop_remainder else ""))
        epoch, step = start
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"start position {start} is outside an epoch of {self.steps_per_epoch} steps")
        self.start = (epoch, step)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.items))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def step_indices(self, epoch: int, step: int) -> np.ndarray:
        """Indices into `items` of the whole global batch `step` of `epoch` (every host's rows)."""
        return self.epoch_order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[HostBatch[T]]:
        order = self.epoch_order(epoch)
        for step in range(start_step, self.steps_per_epoch):
            begin = step * self.batch_size + self.process_index * self.rows_per_host
            indices = order[begin : begin + self.rows_per_host]
            padding = self.rows_per_host - len(indices)
            items = tuple(self.items[i] for i in indices) + (None,) * padding
            valid = np.arange(self.rows_per_host) < len(indices)
            yield HostBatch(items, valid, epoch, step, self.steps_per_epoch)

    def __iter__(self) -> Iterator[HostBatch[T]]:
        """Batches from the start position on, epoch after epoch, without end."""
        epoch, step = self.start
        while True:
            yield from self.epoch_batches(epoch, step)
            epoch, step = epoch + 1, 0
