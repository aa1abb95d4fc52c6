"""Turns tokenized items into the deterministic micro-batch stacks the training loop consumes.

A step takes `rows_per_step = batch_size * grad_accum` items of the epoch's order, splits them into
`grad_accum` micro-batches of `batch_size` rows, lays each out with `to_arrays` and stacks them into
`[grad_accum, rows, length]` arrays with their `scored_positions`. All micro-batches of a step share
one length and one scored width, those of the step's whole global batch.

On a pod, host p of P feeds block p of every micro-batch (`batch_size / P` rows). Every host knows
the global order, so each computes the same shapes from the same items without exchanging
anything, and the global array the hosts assemble is exactly the stack one host would build: a
run's batches do not depend on how many hosts it has.
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
        if self.batch_size % self.process_count:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of the {self.process_count} hosts")
        self._iterator = BatchIterator(self.items, self.batch_size * self.grad_accum, self.seed, shuffle=self.shuffle)
        self._scored_counts: dict[int, int] = {}

    def steps_per_epoch(self) -> int:
        return self._iterator.steps_per_epoch

    def _scored_count(self, index: int) -> int:
        """Scored tokens in the fullest row of item `index` laid out alone (computed once per item)."""
        if index not in self._scored_counts:
            item = self.items[index]
            mask = self.to_arrays([item], self.length_of(item))["loss_mask"]
            self._scored_counts[index] = int(np.count_nonzero(mask.reshape(-1, mask.shape[-1]), axis=-1).max())
        return self._scored_counts[index]

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """This host's rows of step `index` of `epoch`; the last step of an epoch is filled with None items."""
        indices = [int(i) for i in self._iterator.step_indices(epoch, index)]
        items = [self.items[i] for i in indices]
        items += [None] * (self.batch_size * self.grad_accum - len(items))
        length = bucketed_length(max(self.length_of(item) for item in items if item is not None), self.length_bucket)
        width = None  # one host: with_scored_positions finds the fullest row itself
        if self.process_count > 1:
            width = scored_width(max(self._scored_count(i) for i in indices), length)
        per_host = self.batch_size // self.process_count
        first = self.process_index * per_host
        micro_batches = [self.to_arrays(items[m * self.batch_size + first : m * self.batch_size + first + per_host], length)
                         for m in range(self.grad_accum)]
        stack = {key: np.stack([mb[key] for mb in micro_batches]) for key in micro_batches[0]}
        return with_scored_positions(stack, width)

    def all_batches(self) -> list[dict[str, np.ndarray]]:
        """Every step of one epoch in order (validation sets)."""
        return [self.batch(0, index) for index in range(self.steps_per_epoch())]

