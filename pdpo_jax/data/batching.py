"""Batches in the layout of docs/design.md ("The batch layout").

Every batch is a dict of `[batch, length]` numpy arrays: input_ids, positions, segment_ids,
branch_ids, targets, loss_mask, sequence_ids. Rows are right-padded; lengths are rounded up to a
multiple of `bucket` so a jitted step sees few distinct shapes. `with_scored_positions` adds the
optional `scored_positions` index that lets scoring skip the vocabulary projection of every
position that carries no loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pdpo_jax.data.tokenization import TokenizedExample

BATCH_KEYS = ("input_ids", "positions", "segment_ids", "branch_ids", "targets", "loss_mask", "sequence_ids")
SCORED_POSITIONS = "scored_positions"
MIN_SCORED_WIDTH = 16


def bucketed_length(length: int, bucket: int = 64) -> int:
    """`length` rounded up to a multiple of `bucket` (at least one bucket)."""
    if bucket < 1:
        raise ValueError(f"bucket must be positive, got {bucket}")
    return max(1, -(-length // bucket)) * bucket


def empty_batch(rows: int, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """All-padding arrays: segment 0, no targets, no loss, sequence id -1."""
    batch = {key: np.zeros((rows, length), np.int32) for key in BATCH_KEYS}
    batch["input_ids"][:] = pad_id
    batch["loss_mask"] = np.zeros((rows, length), np.float32)
    batch["sequence_ids"][:] = -1
    return batch


def _row_length(needed: int, pad_to: int | None, bucket: int) -> int:
    if pad_to is None:
        return bucketed_length(needed, bucket)
    if needed > pad_to:
        raise ValueError(f"a row needs {needed} tokens, more than pad_to={pad_to}")
    return pad_to


def per_turn_batch(
    tokenized_examples: Sequence[TokenizedExample | None],
    pad_to: int | None = None,
    pad_id: int = 0,
    bucket: int = 64,
) -> dict[str, np.ndarray]:
    """One example per row, `[prompt | response]`; row i is scored sequence i. `None` entries
    become all-padding rows (the filler of a short last batch)."""
    lengths = [0 if ex is None else len(ex) for ex in tokenized_examples]
    batch = empty_batch(len(tokenized_examples), _row_length(max(lengths, default=0), pad_to, bucket), pad_id)
    for row, example in enumerate(tokenized_examples):
        if example is None:
            continue
        if not example.prompt_ids or not example.response_ids:
            raise ValueError(f"example {example.example_id!r}: prompt and response need at least one token each")
        ids = np.asarray(example.prompt_ids + example.response_ids, np.int32)
        n, first = len(ids), len(example.prompt_ids) - 1  # index whose target is the first response token
        batch["input_ids"][row, :n] = ids
        batch["positions"][row, :n] = np.arange(n)
        batch["segment_ids"][row, :n] = 1
        batch["targets"][row, : n - 1] = ids[1:]
        batch["loss_mask"][row, first : n - 1] = 1.0
        batch["sequence_ids"][row, first : n - 1] = row
    return batch


def shared_prompt_batch(
    prompts: Sequence[Sequence[int]],
    continuations_per_prompt: Sequence[Sequence[Sequence[int]]],
    pad_to: int | None = None,
    pad_id: int = 0,
    bucket: int = 64,
) -> dict[str, np.ndarray]:
    """One prompt per row: trunk `prompt[:-1]` (branch 0), then for each continuation k a branch k
    holding a copy of `prompt[-1]` at the same position followed by the continuation. Sequences are
    numbered consecutively over the batch in order (pairs: chosen 2i, rejected 2i + 1)."""
    if len(prompts) != len(continuations_per_prompt):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations_per_prompt)} continuation lists")
    for i, (prompt, continuations) in enumerate(zip(prompts, continuations_per_prompt)):
        if not prompt:
            raise ValueError(f"prompt {i} is empty; it needs at least one token")
        if not continuations or any(len(c) == 0 for c in continuations):
            raise ValueError(f"prompt {i} needs at least one non-empty continuation")
    needed = [len(p) - 1 + sum(1 + len(c) for c in cs) for p, cs in zip(prompts, continuations_per_prompt)]
    batch = empty_batch(len(prompts), _row_length(max(needed, default=0), pad_to, bucket), pad_id)
    sequence = 0
    for row, (prompt, continuations) in enumerate(zip(prompts, continuations_per_prompt)):
        prompt = np.asarray(prompt, np.int32)
        trunk = len(prompt) - 1
        batch["input_ids"][row, :trunk] = prompt[:-1]
        batch["positions"][row, :trunk] = np.arange(trunk)
        batch["targets"][row, :trunk] = prompt[1:]
        start = trunk
        for branch, continuation in enumerate(continuations, 1):
            tokens = np.concatenate([prompt[-1:], np.asarray(continuation, np.int32)])
            end = start + len(tokens)
            batch["input_ids"][row, start:end] = tokens
            batch["positions"][row, start:end] = np.arange(trunk, trunk + len(tokens))
            batch["branch_ids"][row, start:end] = branch
            batch["targets"][row, start : end - 1] = tokens[1:]
            batch["loss_mask"][row, start : end - 1] = 1.0
            batch["sequence_ids"][row, start : end - 1] = sequence
            sequence += 1
            start = end
        batch["segment_ids"][row, :start] = 1
    return batch


def scored_width(most_scored: int, length: int) -> int:
    """Columns of `scored_positions` for rows of `length` holding at most `most_scored` scored
    tokens: the next power of two (at least MIN_SCORED_WIDTH, at most `length`), so a run sees
    only a handful of shapes."""
    width = MIN_SCORED_WIDTH
    while width < most_scored:
        width *= 2
    return min(width, length)


def with_scored_positions(batch: dict[str, np.ndarray], width: int | None = None) -> dict[str, np.ndarray]:
    """`batch` plus `scored_positions` `[..., width]` int32: the columns where `loss_mask` is
    non-zero, in order, then `length` (one past the row) as filler.

    Works on one batch `[batch, length]` or a micro-batch stack `[accumulation, batch, length]`.
    `width` defaults to `scored_width` of the fullest row; a given width must hold every row.
    """
    scored = np.asarray(batch["loss_mask"]) != 0
    length = scored.shape[-1]
    most_scored = int(scored.sum(axis=-1).max(initial=0))
    width = scored_width(most_scored, length) if width is None else int(width)
    if not most_scored <= width <= length:
        raise ValueError(f"scored_positions width {width} must lie between the fullest row's {most_scored} "
                         f"scored tokens and the row length {length}")
    columns = np.argsort(~scored, axis=-1, kind="stable")[..., :width]  # scored columns first, in order
    kept = np.take_along_axis(scored, columns, axis=-1)
    return {**batch, SCORED_POSITIONS: np.where(kept, columns, length).astype(np.int32)}
