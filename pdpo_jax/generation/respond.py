"""Persona + history in, response text out: the prompt a model answers, sampled, cut at its end of turn.

Shared by `pdpo generate`, the test responses of a run and the preference builder. Prompts are built by the data layer's
`PromptEncoder` (the same ids SFT trains on); a history too long for the context loses its oldest
turns first (`PromptEncoder.fit_history`), exactly like training examples.
Sampling stops at an end-of-sequence id; chat templates close a turn with their own token, which
need not be the tokenizer's EOS, so the sample is cut at whichever comes first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdpo_jax.data.tokenization import PromptEncoder
from pdpo_jax.errors import PdpoError
from pdpo_jax.generation.decode import generate
from pdpo_jax.generation.sampling import Sampler
from pdpo_jax.generation.tree_decode import generate_tree
from pdpo_jax.model import Model, eos_ids


class NoRoomToRespond(PdpoError):
    """A conversation whose persona alone fills the context, leaving no room for the response."""


@dataclass(frozen=True)
class Response:
    text: str
    stopped: bool  # an end of turn (or EOS) was sampled within the token budget
    token_ids: tuple[int, ...]  # sampled ids before the stop


def context_limit(model: Model, max_length: int | None) -> int:
    """Tokens a prompt plus its response may take: `max_length`, never more than the model's positions."""
    limit = int(model.config.max_position_embeddings)
    return limit if max_length is None else min(limit, int(max_length))


def stop_sequences(model: Model, encoder: PromptEncoder) -> tuple[tuple[int, ...], ...]:
    """Id sequences that end a sampled turn: every EOS id and the template's end-of-turn ids."""
    return tuple(dict.fromkeys([(i,) for i in eos_ids(model)] + [tuple(encoder.end_of_turn_ids)]))


def cut_at_stop(token_ids: Sequence[int], stops: Sequence[Sequence[int]]) -> tuple[list[int], bool]:
    """(ids before the earliest stop sequence, whether one was found)."""
    kept, stop = split_at_stop(token_ids, stops)
    return kept, bool(stop)


def split_at_stop(token_ids: Sequence[int], stops: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """(ids before the earliest stop sequence, that stop sequence's ids, or [] when none was sampled)."""
    ids = [int(t) for t in token_ids]
    for start in range(len(ids)):
        for stop in stops:
            if stop and ids[start : start + len(stop)] == list(stop):
                return ids[:start], list(stop)
    return ids, []


def decode_response(tokenizer: Any, token_ids: Sequence[int]) -> str:
    return tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()


def right_padded(prompts: Sequence[Sequence[int]], rows: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`[rows, width]` ids and mask; rows past the prompts repeat the last prompt (one jitted shape
    per batch size, and the filler never changes what the real rows sample)."""
    prompts = list(prompts) + [prompts[-1]] * (rows - len(prompts))
    width = max(len(p) for p in prompts)
    ids = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = 1
    return ids, mask


def respond(model: Model, encoder: PromptEncoder, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
            sampler: Sampler | None, seed: int, rows: int | None = None, mesh: Any = None,
            share_prefixes: bool = False) -> list[Response]:
    """One response per prompt (token ids from `encoder`), sampled in one batch of `rows` rows
    (on `mesh`, split over its batch axes; every process gets every response). With
    `share_prefixes`, consecutive prompts that extend each other (a dialogue's turns) are
    prefilled once (`generate_tree`): the same responses for less work."""
    if not prompts:
        return []
    rows = max(rows or len(prompts), len(prompts))
    if share_prefixes:
        sampled = generate_tree(model, prompts, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed, rows=rows,
                                mesh=mesh)
    else:
        ids, mask = right_padded(prompts, rows, pad_id=0)
        sampled = generate(model, ids, mask, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed, mesh=mesh)
    stops = stop_sequences(model, encoder)
    responses = []
    for row in range(len(prompts)):
        kept, stopped = cut_at_stop(sampled[row], stops)
        responses.append(Response(decode_response(model.tokenizer, kept), stopped, tuple(kept)))
    return responses


def respond_to_conversations(model: Model, encoder: PromptEncoder,
                             conversations: Sequence[tuple[Sequence[str], Sequence[str]]], *, max_new_tokens: int,
                             sampler: Sampler | None, seed: int, batch_size: int, max_length: int | None = None,
                             mesh: Any = None) -> list[tuple[Response, int]]:
    """A response to every (persona, history), sampled `batch_size` at a time (batch b with seed
    `seed + b`, every batch in one shape), each with how many of the oldest history turns were left
    out so that the prompt and `max_new_tokens` fit `max_length` and the model's positions. Raises
    NoRoomToRespond naming the conversation (counted from 1) whose persona alone does not fit."""
    room = context_limit(model, max_length) - max_new_tokens
    prompts, dropped = [], []
    for number, (persona, history) in enumerate(conversations, 1):
        kept = encoder.fit_history(persona, history, room)
        if kept is None:
            raise NoRoomToRespond(f"conversation {number}: the persona alone leaves no room for "
                                  f"{max_new_tokens} new tokens")
        prompts.append(encoder.prompt_ids(persona, kept))
        dropped.append(len(history) - len(kept))
    responses: list[Response] = []
    for batch, start in enumerate(range(0, len(prompts), batch_size)):
        responses += respond(model, encoder, prompts[start : start + batch_size], max_new_tokens=max_new_tokens,
                             sampler=sampler, seed=seed + batch, rows=min(batch_size, len(prompts)), mesh=mesh)
    return list(zip(responses, dropped))
