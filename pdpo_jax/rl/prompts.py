"""The prompts PPO answers: each example's persona + history, cut to leave room for the response,
served as deterministic epoch batches (`pdpo_jax.train.loop.EpochBatches`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdpo_jax.data import BatchIterator, Example, ExampleTooLongError, PromptEncoder
from pdpo_jax.generation import right_padded


@dataclass(frozen=True)
class RLPrompt:
    example_id: str
    persona: tuple[str, ...]  # what the reward checks the response against
    prompt_ids: tuple[int, ...]


def rl_prompts(examples: Sequence[Example], encoder: PromptEncoder, *, room: int,
               on_overflow: str = "error") -> tuple[list[RLPrompt], list[str]]:
    """(prompts, ids of the examples skipped): each prompt keeps the longest history tail that fits
    in `room` tokens (`PromptEncoder.fit_history`); one whose persona alone does not fit is an error,
    or skipped with `on_overflow="skip"`."""
    prompts, skipped = [], []
    for example in examples:
        history = encoder.fit_history(example.persona, example.history, room)
        if history is None:
            if on_overflow == "error":
                raise ExampleTooLongError(f"example {example.id!r}: the persona alone leaves no room in {room} prompt "
                                          "tokens for the response; set data.on_overflow=skip to leave such examples out")
            skipped.append(example.id)
            continue
        prompts.append(RLPrompt(example.id, tuple(example.persona), tuple(encoder.prompt_ids(example.persona, history))))
    return prompts, skipped


class PromptBatches:
    """Step `index` of `epoch`: `rows` prompts of the epoch's order (seeded by (seed, epoch)), as
    `prompt_ids` and `segment_ids` (its mask) `[rows, width]` right-padded, and `prompt_index` `[rows]`
    into `prompts` (-1 on the filler rows of a short last batch, which repeat the last prompt)."""

    def __init__(self, prompts: Sequence[RLPrompt], rows: int, seed: int, *, shuffle: bool, pad_id: int):
        self.prompts, self.rows, self.pad_id = prompts, rows, pad_id
        self._iterator = BatchIterator(prompts, rows, seed, shuffle=shuffle)

    def steps_per_epoch(self) -> int:
        return self._iterator.steps_per_epoch

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        indices = self._iterator.step_indices(epoch, index)
        ids, mask = right_padded([self.prompts[int(i)].prompt_ids for i in indices], self.rows, self.pad_id)
        prompt_index = np.full((self.rows,), -1, np.int32)
        prompt_index[: len(indices)] = indices
        return {"prompt_ids": ids, "segment_ids": mask, "prompt_index": prompt_index}

    def all_batches(self) -> list[dict[str, np.ndarray]]:
        return [self.batch(0, index) for index in range(self.steps_per_epoch())]
