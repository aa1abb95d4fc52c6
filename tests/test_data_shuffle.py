"""Persona derangement: no fixed points, never identical persona text, reproducible per seed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdpo_jax.data import MODEL, DerangementError, Dialogue, Turn, persona_derangement, persona_key

TURNS = (Turn(MODEL, "hello"),)


def make_dialogues(persona_ids: list[int], conversation_of: list[int] | None = None) -> list[Dialogue]:
    out = []
    for i, p in enumerate(persona_ids):
        # the same persona written with different case/spacing/order is still the same persona
        persona = (f"i like thing {p} .", f"i am {p} years old .") if i % 2 else (f"i am {p}  years old .", f"I like thing {p} .")
        conversation = f"c{conversation_of[i]}" if conversation_of else ""
        out.append(Dialogue(f"dialogue-{i:03d}", persona, None, TURNS, conversation_id=conversation))
    return out


def feasible(persona_ids: list[int]) -> bool:
    return len(persona_ids) >= 2 and 2 * max(persona_ids.count(p) for p in set(persona_ids)) <= len(persona_ids)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=2, max_size=40), st.integers(0, 2**31 - 1))
def test_derangement_properties(persona_ids, seed):
    dialogues = make_dialogues(persona_ids)
    if not feasible(persona_ids):
        with pytest.raises(DerangementError):
            persona_derangement(dialogues, seed)
        return
    mapping = persona_derangement(dialogues, seed)
    by_id = {d.id: d for d in dialogues}
    assert set(mapping) == set(by_id)
    assert sorted(mapping.values()) == sorted(by_id)  # each persona lent exactly once
    for receiver, donor in mapping.items():
        assert receiver != donor
        assert persona_key(by_id[receiver].persona) != persona_key(by_id[donor].persona)
    assert persona_derangement(list(reversed(dialogues)), seed) == mapping


def test_reproducible_per_seed_and_varies_with_it():
    dialogues = make_dialogues(list(range(50)))
    assert persona_derangement(dialogues, 7) == persona_derangement(dialogues, 7)
    assert persona_derangement(dialogues, 7) != persona_derangement(dialogues, 8)


def test_views_of_one_conversation_never_swap_with_each_other():
    dialogues = make_dialogues(list(range(6)), conversation_of=[0, 0, 1, 1, 2, 2])
    conversation = {d.id: d.conversation_id for d in dialogues}
    for seed in range(20):
        mapping = persona_derangement(dialogues, seed)
        assert all(conversation[a] != conversation[b] for a, b in mapping.items())


def test_no_shuffle_is_identity_and_impossible_cases_are_explained():
    dialogues = make_dialogues([1, 1, 1, 2])
    assert persona_derangement(dialogues, 0, shuffle=False) == {d.id: d.id for d in dialogues}
    with pytest.raises(DerangementError, match="3 of 4 dialogues share one persona"):
        persona_derangement(dialogues, 0)
    with pytest.raises(DerangementError, match="at least 2"):
        persona_derangement(dialogues[:1], 0)
    with pytest.raises(ValueError, match="appears more than once"):
        persona_derangement(dialogues + dialogues[:1], 0)
