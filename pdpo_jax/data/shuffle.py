"""Which dialogue lends its persona to which, for pseudo-negative generation.

A derangement at the dialogue level: every dialogue receives the persona of another dialogue whose
persona differs as a set of sentences (compared case- and space-insensitively) and which is not a
view of the same conversation. Every dialogue lends its persona exactly once. The result depends
only on the seed and the set of dialogue ids, not on their order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from pdpo_jax.data.dialogue import Dialogue
from pdpo_jax.errors import PdpoError

_REPAIR_ROUNDS = 200


class DerangementError(PdpoError):
    """No valid persona assignment exists (or none was found) for the given dialogues."""


def persona_key(persona: Sequence[str]) -> frozenset[str]:
    return frozenset(" ".join(sentence.lower().split()) for sentence in persona)


def persona_derangement(dialogues: Sequence[Dialogue], seed: int, shuffle: bool = True) -> dict[str, str]:
    """{dialogue id: donor dialogue id}. With `shuffle=False` every dialogue keeps its own persona
    (the ablation without persona shuffling)."""
    ordered = sorted(dialogues, key=lambda d: d.id)
    ids = [d.id for d in ordered]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"dialogue id {duplicate!r} appears more than once")
    if not shuffle:
        return {i: i for i in ids}
    keys = [persona_key(d.persona) for d in ordered]
    conversations = [d.conversation_id for d in ordered]
    _check_possible(ids, keys)

    def allowed(receiver: int, donor: int) -> bool:
        return keys[receiver] != keys[donor] and conversations[receiver] != conversations[donor]

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ordered))
    donor_of = np.empty(len(ordered), dtype=np.int64)
    donor_of[order] = np.roll(order, -1)  # one cycle through a random order: no fixed points
    for _ in range(_REPAIR_ROUNDS):
        conflicts = [i for i in rng.permutation(len(ordered)) if not allowed(i, donor_of[i])]
        if not conflicts:
            return {ids[i]: ids[donor_of[i]] for i in range(len(ordered))}
        for i in conflicts:
            if allowed(i, donor_of[i]):
                continue
            for j in rng.integers(0, len(ordered), size=64):
                if allowed(i, donor_of[j]) and allowed(j, donor_of[i]):
                    donor_of[i], donor_of[j] = donor_of[j], donor_of[i]
                    break
    raise DerangementError(
        f"could not give each of {len(ordered)} dialogues a different persona after {_REPAIR_ROUNDS} rounds "
        "(too many dialogues share a persona or a conversation)"
    )


def _check_possible(ids: list[str], keys: list[frozenset[str]]) -> None:
    if len(ids) < 2:
        raise DerangementError(f"persona shuffling needs at least 2 dialogues, got {len(ids)}")
    key, count = Counter(keys).most_common(1)[0]
    if 2 * count > len(ids):
        example = next(i for i, k in zip(ids, keys) if k == key)
        raise DerangementError(
            f"{count} of {len(ids)} dialogues share one persona (e.g. {example!r}); more than half, so they "
            "cannot all receive a different persona"
        )
