"""Removing dialogues that an evaluation set was built from.

The DNLI evaluation set was cut from PersonaChat dialogues after rewriting contractions and
punctuation, so utterances are compared after the same normalization: lower case, contractions
undone ("i'm" -> "i am", "n't" -> " not", ...), punctuation removed, spaces squashed.

A DNLI example is a dialogue's opening utterances (its prefix) and the next one (the gold). A
dialogue is dropped when it shares at least `MIN_SHARED` of those utterances, from either speaker,
with one example (all of them when the example has fewer). One shared line is not enough: openers
such as "hi , how are you ?" or "what do you do for a living ?" occur in hundreds of unrelated
dialogues, and dropping every dialogue that says one would discard a third of PersonaChat's train
split for no leak. A source dialogue shares its whole prefix and gold with its examples.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
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
MIN_SHARED = 3
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
    examples_matched: int  # evaluation examples whose source dialogue was among the input
    dropped_ids: tuple[str, ...]

    def summary(self) -> str:
        return (
            f"kept {self.dialogues_kept} of {self.dialogues_in} dialogues; dropped {self.dialogues_dropped} sharing "
            f">= {MIN_SHARED} utterances with one of {self.evaluation_examples} evaluation examples "
            f"({self.examples_matched} of which came from these dialogues)"
        )


def example_utterances(example: DnliExample) -> frozenset[str]:
    """The normalized prefix utterances and gold response of one evaluation example."""
    return frozenset(u for u in map(normalize_utterance, (*example.history, example.gold)) if u)


def shares_an_example(utterances: set[str], example: frozenset[str]) -> bool:
    return len(utterances & example) >= min(MIN_SHARED, len(example))


def drop_overlapping(
    dialogues: Sequence[Dialogue], dnli_examples: Sequence[DnliExample]
) -> tuple[list[Dialogue], OverlapReport]:
    examples = [example_utterances(e) for e in dnli_examples]
    by_utterance: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        for utterance in example:
            by_utterance.setdefault(utterance, []).append(index)
    kept, dropped, matched = [], [], set()
    for dialogue in dialogues:
        utterances = {normalize_utterance(turn.text) for turn in dialogue.turns}
        candidates = {i for u in utterances for i in by_utterance.get(u, ())}
        sources = {i for i in candidates if shares_an_example(utterances, examples[i])}
        if sources:
            dropped.append(dialogue.id)
            matched |= sources
        else:
            kept.append(dialogue)
    report = OverlapReport(len(dialogues), len(kept), len(dropped), len(dnli_examples), len(matched), tuple(dropped))
    return kept, report
