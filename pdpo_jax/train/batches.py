"""Turns tokenized items into the deterministic micro-batch stacks the training loop consumes.

A step takes `rows_per_step = batch_size * grad_accum` items of the epoch's order (this host's
share of them on a pod), lays them out with `to_arrays`, and stacks `grad_accum` micro-batches
into `[grad_accum, rows, length]` arrays with their `scored_positions`. All micro-batches of a step
share one length and one scored width; on several hosts every step uses the longest item and the
most scored tokens of the whole set, so all hosts agree on the shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from pdpo_jax.data import BatchIterator, bucketed_length, scored_width, with_scored_positions

ToArrays = Callable[[Sequence[Any], int], dict[str, np.ndarray]]  # (items or None, pad_to) -> layout arrays


@dataclass
class StepBatches:
    items: Sequence[Any]
    batch_size: int
    grad_accum: int
    seed: int
    to_arrays: ToArrays
    length_of: Callable[[Any], int]
    length_bucket: int = 64
    shuffle: bool = True
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self) -> None:
        self._iterator = BatchIterator(self.items, self.batch_size * self.grad_accum, self.seed,
                                       shuffle=self.shuffle, process_index=self.process_index,
                                       process_count=self.process_count)
        self._longest = max(self.length_of(item) for item in self.items)
        self._most_scored = None
        if self.process_count > 1:
            self._most_scored = max(int(np.count_nonzero(self.to_arrays([item], self.length_of(item))["loss_mask"]))
                                    for item in self.items)

    def steps_per_epoch(self) -> int:
        return self._iterator.steps_per_epoch

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        host_batch = next(self._iterator.epoch_batches(epoch, index))
        rows = list(host_batch.items)
        if self.process_count > 1:
            length = bucketed_length(self._longest, self.length_bucket)
        else:
            longest = max(self.length_of(item) for item in rows if item is not None)
            length = bucketed_length(longest, self.length_bucket)
        per_micro = len(rows) // self.grad_accum
        micro_batches = [self.to_arrays(rows[i * per_micro:(i + 1) * per_micro], length)
                         for i in range(self.grad_accum)]
        stack = {key: np.stack([mb[key] for mb in micro_batches]) for key in micro_batches[0]}
        width = None if self._most_scored is None else scored_width(self._most_scored, length)
        return with_scored_positions(stack, width)

    def all_batches(self) -> list[dict[str, np.ndarray]]:
        """Every step of one epoch in order (validation sets)."""
        return [self.batch(0, index) for index in range(self.steps_per_epoch())]

