"""Removing dialogues that an evaluation set was built from.

The DNLI evaluation set was cut from PersonaChat dialogues after rewriting contractions and
punctuation, so utterances are compared after the same normalization: lower case, contractions
undone ("i'm" -> "i am", "n't" -> " not", ...), punctuation removed, spaces squashed. A dialogue
is dropped when any of its utterances, from either speaker, equals a DNLI gold response or prefix
utterance.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pdpo_jax.data.dialogue import Dialogue
from pdpo_jax.data.dnli import DnliExample

_CONTRACTIONS = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"\bwon'?t\b", "will not"),
        (r"\bcan'?t\b", "can not"),
        (r"\bcannot\b", "can not"),
        (r"\bshan't\b", "shall not"),
        (r"\bain't\b", "is not"),
        (r"\blet's\b", "let us"),
        (r"n't\b", " not"),
        (r"'re\b", " are"),
        (r"'m\b", " am"),
        (r"'ve\b", " have"),
        (r"'ll\b", " will"),
        (r"'d\b", " would"),
        (r"\b(it|that|what|he|she|there|here|who|where|how|this|everything|nothing)'s\b", r"\1 is"),
    )
)
_APOSTROPHE_SPACING = re.compile(r"\s*'\s*")
_PUNCTUATION = re.compile(r"[^\w\s]|_")


def normalize_utterance(text: str) -> str:
    text = text.lower().replace("\u2019", "'").replace("`", "'")
    text = _APOSTROPHE_SPACING.sub("'", text)  # "i ' m" and "i' m" -> "i'm"
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    return " ".join(_PUNCTUATION.sub(" ", text).split())


@dataclass(frozen=True)
class OverlapReport:
    dialogues_in: int
    dialogues_kept: int
    dialogues_dropped: int
    evaluation_examples: int
    evaluation_utterances: int  # distinct normalized utterances looked for
    dropped_ids: tuple[str, ...]

    def summary(self) -> str:
        return (
            f"kept {self.dialogues_kept} of {self.dialogues_in} dialogues; dropped {self.dialogues_dropped} sharing an "
            f"utterance with {self.evaluation_examples} evaluation examples ({self.evaluation_utterances} distinct utterances)"
        )


def evaluation_utterances(examples: Iterable[DnliExample]) -> set[str]:
    """Normalized gold responses and prefix utterances of the evaluation examples."""
    found: set[str] = set()
    for example in examples:
        found.add(normalize_utterance(example.gold))
        found.update(normalize_utterance(text) for text in example.history)
    found.discard("")
    return found


def drop_overlapping(
    dialogues: Sequence[Dialogue], dnli_examples: Sequence[DnliExample]
) -> tuple[list[Dialogue], OverlapReport]:
    banned = evaluation_utterances(dnli_examples)
    kept, dropped = [], []
    for dialogue in dialogues:
        if any(normalize_utterance(turn.text) in banned for turn in dialogue.turns):
            dropped.append(dialogue.id)
        else:
            kept.append(dialogue)
    report = OverlapReport(len(dialogues), len(kept), len(dropped), len(dnli_examples), len(banned), tuple(dropped))
    return kept, report
