"""Training examples (one per model turn) and deterministic by-dialogue splits."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pdpo_jax.data.dialogue import Dialogue, history_speakers


@dataclass(frozen=True)
class Example:
    """The model's response to `history` (oldest first, ending with the partner line answered;
    empty when the model opens) given `persona`."""

    id: str  # f"{dialogue_id}#{turn_index}"
    dialogue_id: str
    persona: tuple[str, ...]
    history: tuple[str, ...]
    response: str

    @property
    def history_speakers(self) -> tuple[str, ...]:
        return history_speakers(len(self.history))


def examples_from_dialogues(dialogues: Iterable[Dialogue]) -> list[Example]:
    return [
        Example(f"{d.id}#{turn.index}", d.id, d.persona, turn.history, turn.response)
        for d in dialogues
        for turn in d.model_turns()
    ]


def split_fraction(key: str, seed: int) -> float:
    """A number in [0, 1) that depends only on (seed, key)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_dialogues(
    dialogues: Sequence[Dialogue], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[list[Dialogue], ...]:
    """One list per fraction. A dialogue's split depends only on its conversation id and the seed,
    so it never moves when other dialogues are added, and both views of a conversation stay together."""
    if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    bounds, total = [], 0.0
    for fraction in fractions:
        total += fraction
        bounds.append(total)
    last_used = max(i for i, f in enumerate(fractions) if f > 0)
    bounds[last_used:] = [1.0] * (len(bounds) - last_used)  # no key may fall past rounding error
    parts: tuple[list[Dialogue], ...] = tuple([] for _ in fractions)
    for dialogue in dialogues:
        u = split_fraction(dialogue.conversation_id, seed)
        part = next(i for i, bound in enumerate(bounds) if u < bound)
        parts[part].append(dialogue)
    return parts
