"""A dialogue seen from the speaker the model plays.

`Dialogue.turns` alternate strictly between "partner" and "model", so the speaker of every earlier
utterance follows from the turn being answered; `model_turns()` lists every turn the model plays
with the history before it. The two views of one conversation share a `conversation_id`, which
splits and persona shuffling use to keep the views together.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

MODEL = "model"
PARTNER = "partner"
SPEAKERS = (MODEL, PARTNER)


@dataclass(frozen=True)
class Turn:
    speaker: str  # MODEL or PARTNER
    text: str


@dataclass(frozen=True)
class ModelTurn:
    """One utterance of the model: its index in `Dialogue.turns` and the history it answers."""

    index: int
    history: tuple[str, ...]
    response: str


@dataclass(frozen=True)
class Dialogue:
    id: str
    persona: tuple[str, ...]
    partner_persona: tuple[str, ...] | None
    turns: tuple[Turn, ...]
    source: str = ""
    conversation_id: str = field(default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "persona", tuple(self.persona))
        object.__setattr__(self, "turns", tuple(self.turns))
        if self.partner_persona is not None:
            object.__setattr__(self, "partner_persona", tuple(self.partner_persona))
        if not self.conversation_id:
            object.__setattr__(self, "conversation_id", self.id)
        if not self.id:
            raise ValueError("a dialogue needs a non-empty id")
        if not self.persona:
            raise ValueError(f"dialogue {self.id!r} has no persona")
        for index, turn in enumerate(self.turns):
            if turn.speaker not in SPEAKERS:
                raise ValueError(f"dialogue {self.id!r} turn {index}: speaker {turn.speaker!r} is not one of {SPEAKERS}")
            if not turn.text.strip():
                raise ValueError(f"dialogue {self.id!r} turn {index}: empty utterance")
            if index and turn.speaker == self.turns[index - 1].speaker:
                raise ValueError(f"dialogue {self.id!r} turn {index}: two {turn.speaker} turns in a row")

    def model_turns(self) -> Iterator[ModelTurn]:
        """Every turn the model plays, with all earlier utterances (oldest first) as history."""
        texts = tuple(turn.text for turn in self.turns)
        for index, turn in enumerate(self.turns):
            if turn.speaker == MODEL:
                yield ModelTurn(index=index, history=texts[:index], response=turn.text)

    def swapped(self) -> Dialogue:
        """The same conversation seen from the partner; needs the partner's persona."""
        if self.partner_persona is None:
            raise ValueError(f"dialogue {self.id!r} has no partner persona to swap to")
        flipped = tuple(Turn(PARTNER if t.speaker == MODEL else MODEL, t.text) for t in self.turns)
        return Dialogue(
            id=f"{self.id}:partner",
            persona=self.partner_persona,
            partner_persona=self.persona,
            turns=flipped,
            source=self.source,
            conversation_id=self.conversation_id,
        )


def history_speakers(history_length: int) -> tuple[str, ...]:
    """Speakers of a history that ends with the partner line being answered (turns alternate)."""
    return tuple(PARTNER if (history_length - i) % 2 else MODEL for i in range(history_length))


def with_swapped(dialogues: list[Dialogue]) -> list[Dialogue]:
    """Each dialogue followed by its partner view where the partner persona is known."""
    out: list[Dialogue] = []
    for dialogue in dialogues:
        out.append(dialogue)
        if dialogue.partner_persona:
            out.append(dialogue.swapped())
    return out


def alternating_turns(utterances: list[tuple[str, str]]) -> tuple[Turn, ...]:
    """Turns from (speaker, text) pairs, joining consecutive utterances of one speaker with a space."""
    turns: list[Turn] = []
    for speaker, text in utterances:
        if turns and turns[-1].speaker == speaker:
            turns[-1] = Turn(speaker, f"{turns[-1].text} {text}")
        else:
            turns.append(Turn(speaker, text))
    return tuple(turns)
