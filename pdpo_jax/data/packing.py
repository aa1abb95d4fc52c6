"""Packed SFT rows: a dialogue's prompt once, every model response in it scored.

Prompts nest (turn t+1's prompt = turn t's prompt + response + end of turn + the next partner
line, see templates.py), so the ids of the last model turn's `[prompt | response]` hold every
earlier turn's `[prompt | response]` as a prefix. One row scores them all; targets and loss mask
are exactly those of the per-turn rows, at a fraction of the tokens.

A dialogue longer than `max_length` is cut at model-turn boundaries into chunks. Each chunk holds
as many consecutive model turns as fit with the persona, then as much of the history before its
first turn as still fits, dropped by the per-turn truncation rule (`PromptEncoder.fit_prompt`).
Every response is scored in exactly one chunk. Chunks (of one or several dialogues) share rows as
separate segments, placed first-fit-decreasing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdpo_jax.data.batching import _row_length, empty_batch
from pdpo_jax.data.dialogue import Dialogue
from pdpo_jax.data.iterator import BatchIterator, HostBatch
from pdpo_jax.data.templates import TemplateError
from pdpo_jax.data.tokenization import OVERFLOW_POLICIES, ExampleTooLongError, PromptEncoder, history_drop_choices


class PackingError(TemplateError):
    """A dialogue whose per-turn prompts are not token prefixes of each other cannot be packed."""


@dataclass(frozen=True)
class DialogueChunk:
    """Consecutive model turns of one dialogue in one segment."""

    dialogue_id: str
    input_ids: tuple[int, ...]
    response_spans: tuple[tuple[int, int], ...]  # [start, end) of each scored response, end-of-turn ids included
    turn_indices: tuple[int, ...]  # index in Dialogue.turns of each scored response
    dropped_history_turns: int  # oldest turns of the dialogue left out of this chunk

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class PackedRow:
    """Chunks sharing one row, each its own segment (1, 2, ...)."""

    chunks: tuple[DialogueChunk, ...]

    def __len__(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    @property
    def num_responses(self) -> int:
        return sum(len(chunk.response_spans) for chunk in self.chunks)


def dialogue_chunks(
    dialogue: Dialogue, encoder: PromptEncoder, max_length: int | None, on_overflow: str = "error"
) -> list[DialogueChunk]:
    """The dialogue as few chunks of at most `max_length` tokens (one when it fits). A model turn
    whose persona and response alone exceed `max_length` raises ExampleTooLongError, or with
    `on_overflow="skip"` is left unscored. Raises PackingError when prompts do not nest."""
    if on_overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"on_overflow must be one of {OVERFLOW_POLICIES}, not {on_overflow!r}")
    turns = list(dialogue.model_turns())
    responses = [tuple(encoder.response_ids(turn.response)) for turn in turns]

    def row_length(last: int, dropped: int) -> int:
        return len(_prompt(encoder, dialogue, turns[last].history[dropped:], turns[last].index)) + len(responses[last])

    chunks: list[DialogueChunk] = []
    first = 0
    while first < len(turns):
        # The chunk's history is cut like its first turn's would be per turn, so its first response stays.
        choices = history_drop_choices(turns[first].index)
        most_dropped = choices[-1]
        if max_length is not None and row_length(first, most_dropped) > max_length:
            if on_overflow == "skip":
                first += 1
                continue
            raise ExampleTooLongError(
                f"dialogue {dialogue.id!r} turn {turns[first].index}: persona and response alone take "
                f"{row_length(first, most_dropped)} tokens, more than max_length={max_length}"
            )
        end = first + 1
        while end < len(turns) and (max_length is None or row_length(end, most_dropped) <= max_length):
            end += 1
        last = turns[end - 1]
        try:
            prompt, dropped = encoder.fit_prompt(
                dialogue.persona, last.history, len(responses[end - 1]), max_length, drop_choices=choices,
                name=f"dialogue {dialogue.id!r} turn {last.index}",
            )
        except TemplateError as err:
            raise _not_nesting(dialogue, last.index, err) from None
        chunks.append(_chunk(dialogue, encoder, turns[first:end], responses[first:end], prompt, dropped))
        first = end
    return chunks


def _prompt(encoder: PromptEncoder, dialogue: Dialogue, history: Sequence[str], turn_index: int) -> tuple[int, ...]:
    try:
        return tuple(encoder.prompt_ids(dialogue.persona, history))
    except TemplateError as err:
        raise _not_nesting(dialogue, turn_index, err) from None


def _not_nesting(dialogue: Dialogue, turn_index: int, detail: Any) -> PackingError:
    return PackingError(
        f"dialogue {dialogue.id!r} turn {turn_index}: cannot pack this dialogue because its prompts do not nest "
        f"(each model turn's prompt + response must be a token prefix of the next turn's prompt): {detail}. "
        "Check the template with check_prefix_property, or train on per-turn rows (sft.packing=turn)."
    )


def _chunk(dialogue, encoder, turns, responses, prompt, dropped) -> DialogueChunk:
    """The chunk's ids are the last turn's [prompt | response]; every earlier turn's own
    [prompt | response] (same history cut) must be a prefix of them. That check is the cheap proof
    that packing scores exactly what per-turn rows would."""
    ids = prompt + responses[-1]
    spans = []
    for turn, response in zip(turns, responses):
        turn_prompt = prompt if turn is turns[-1] else _prompt(encoder, dialogue, turn.history[dropped:], turn.index)
        start, end = len(turn_prompt), len(turn_prompt) + len(response)
        if ids[:start] != turn_prompt or ids[start:end] != response:
            mismatch = next(
                (i for i, (a, b) in enumerate(zip(ids, turn_prompt + response)) if a != b), min(len(ids), end)
            )
            raise _not_nesting(
                dialogue, turn.index,
                f"its prompt + response differ from the last turn's ids at token {mismatch}",
            )
        spans.append((start, end))
    return DialogueChunk(dialogue.id, ids, tuple(spans), tuple(t.index for t in turns), dropped)


def pack_chunks(chunks: Sequence[DialogueChunk], max_length: int, pack: bool = True) -> list[PackedRow]:
    """Rows of at most `max_length` tokens, placed first-fit-decreasing (ties in input order, so the
    result is deterministic); without `pack`, one chunk per row in input order."""
    too_long = next((c for c in chunks if len(c) > max_length), None)
    if too_long is not None:
        raise ValueError(f"dialogue {too_long.dialogue_id!r}: a chunk of {len(too_long)} tokens exceeds max_length={max_length}")
    if not pack:
        return [PackedRow((chunk,)) for chunk in chunks]
    rows: list[list[DialogueChunk]] = []
    room: list[int] = []
    for chunk in sorted(chunks, key=len, reverse=True):  # sorted() is stable
        row = next((i for i, free in enumerate(room) if free >= len(chunk)), None)
        if row is None:
            rows.append([])
            room.append(max_length)
            row = len(rows) - 1
        rows[row].append(chunk)
        room[row] -= len(chunk)
    return [PackedRow(tuple(row)) for row in rows]


def pack_dialogues(
    dialogues: Sequence[Dialogue],
    encoder: PromptEncoder,
    max_length: int,
    *,
    on_overflow: str = "error",
    pack: bool = True,
) -> list[PackedRow]:
    """Every dialogue's model turns in rows of at most `max_length` tokens (see the module doc)."""
    chunks = [chunk for dialogue in dialogues for chunk in dialogue_chunks(dialogue, encoder, max_length, on_overflow)]
    return pack_chunks(chunks, max_length, pack)


def packed_batch(
    rows: Sequence[PackedRow | None], pad_to: int | None = None, pad_id: int = 0, bucket: int = 64
) -> dict[str, np.ndarray]:
    """The batch layout of docs/design.md: segment s of a row is its s-th chunk, positions restart at
    0 in every segment, targets are the next token of the same segment, and every response token
    (end of turn included) is scored. Responses are numbered consecutively over the batch (row by
    row, chunk by chunk). `None` rows are padding."""
    lengths = [0 if row is None else len(row) for row in rows]
    batch = empty_batch(len(rows), _row_length(max(lengths, default=0), pad_to, bucket), pad_id)
    sequence = 0
    for r, row in enumerate(rows):
        if row is None:
            continue
        offset = 0
        for segment, chunk in enumerate(row.chunks, 1):
            ids = np.asarray(chunk.input_ids, np.int32)
            n = len(ids)
            end = offset + n
            batch["input_ids"][r, offset:end] = ids
            batch["positions"][r, offset:end] = np.arange(n)
            batch["segment_ids"][r, offset:end] = segment
            batch["targets"][r, offset : end - 1] = ids[1:]
            for start, stop in chunk.response_spans:  # the token before a response predicts its first token
                batch["loss_mask"][r, offset + start - 1 : offset + stop - 1] = 1.0
                batch["sequence_ids"][r, offset + start - 1 : offset + stop - 1] = sequence
                sequence += 1
            offset = end
    return batch


def packed_batches(
    rows: Sequence[PackedRow],
    batch_size: int,
    seed: int,
    *,
    pad_to: int | None = None,
    pad_id: int = 0,
    bucket: int = 64,
    **iterator_options: Any,
) -> Iterator[tuple[HostBatch[PackedRow], dict[str, np.ndarray]]]:
    """`BatchIterator` over packed rows (sharded per host, reshuffled per epoch, resumable; see its
    options), each host batch with its arrays. Runs epoch after epoch without end."""
    for host_batch in BatchIterator(rows, batch_size, seed, **iterator_options):
        yield host_batch, packed_batch(host_batch.items, pad_to, pad_id, bucket)


def packing_summary(rows: Sequence[PackedRow], max_length: int) -> dict[str, float]:
    """Counts for logs: rows, chunks, dialogues, scored responses, tokens and how full rows are."""
    tokens = sum(len(row) for row in rows)
    return {
        "rows": len(rows),
        "chunks": sum(len(row.chunks) for row in rows),
        "dialogues": len({chunk.dialogue_id for row in rows for chunk in row.chunks}),
        "responses": sum(row.num_responses for row in rows),
        "tokens": tokens,
        "fill": tokens / max(1, len(rows) * max_length),
    }
