"""Turns tokenized items into the deterministic micro-batch stacks the training loop consumes.

A step takes `rows_per_step = batch_size * grad_accum` items of the epoch's order, splits them into
`grad_accum` micro-batches of `batch_size` rows, lays each out with `to_arrays` and stacks them into
`[grad_accum, rows, length]` arrays with their `scored_positions`. All micro-batches of a step share
one length and one scored width, those of the step's whole global batch.

On a pod every host knows the global order: each lays out the step's whole global batch, exactly
as one host would, and keeps the rows its devices hold of every array's batch axis (its rows, and
the pairs of DPO's per-pair arrays), so shapes agree without exchanging anything, sequence ids stay
global, and the arrays the hosts assemble are the single-host stack: a run's batches do not depend
on how many hosts it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from pdpo_jax.data import BatchIterator, bucketed_length, with_scored_positions

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
    # On a pod: the indices this host feeds of an n-long batch axis (`pdpo_jax.parallel.host_rows`
    # of the run's mesh); None on one host.
    host_rows: Callable[[int], np.ndarray] | None = None

    def __post_init__(self) -> None:
        self._iterator = BatchIterator(self.items, self.batch_size * self.grad_accum, self.seed, shuffle=self.shuffle)

    def steps_per_epoch(self) -> int:
        return self._iterator.steps_per_epoch

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """This host's part of step `index` of `epoch`; the last step of an epoch is filled with None items."""
        items = [self.items[int(i)] for i in self._iterator.step_indices(epoch, index)]
        items += [None] * (self.batch_size * self.grad_accum - len(items))
        length = bucketed_length(max(self.length_of(item) for item in items if item is not None), self.length_bucket)
        micro_batches = [self.to_arrays(items[m * self.batch_size : (m + 1) * self.batch_size], length)
                         for m in range(self.grad_accum)]
        stack = {key: np.stack([mb[key] for mb in micro_batches]) for key in micro_batches[0]}
        if "loss_mask" in stack:  # a layout that scores tokens (a classifier's has labels instead)
            stack = with_scored_positions(stack)
        if self.host_rows is None:
            return stack
        return {key: np.take(value, self.host_rows(value.shape[1]), axis=1) for key, value in stack.items()}

    def all_batches(self) -> list[dict[str, np.ndarray]]:
        """Every step of one epoch in order (validation sets)."""
        return [self.batch(0, index) for index in range(self.steps_per_epoch())]

