"""How nearly a response repeats a persona sentence verbatim: the share of the sentence's word
pairs (adjacent lowercased words) that the response also holds.

    persona_copy(["i like to ski ."], "I like to ski!")        # 1.0: verbatim, case and punctuation aside
    copied_sentence(persona, response, threshold=0.8)          # (index, share) of the most copied, or None

A response *copies* a sentence when it holds at least `COPY_THRESHOLD` (80%) of the sentence's
word pairs: a persona fact restated nearly word for word, with a word or two changed at most.
Word pairs rather than single words, so that a response that merely shares common words ("i",
"like") with a sentence does not count. The known failure of a consistency-only reward is a model
that repeats persona facts instead of answering; the evaluation of generated responses and the
`copy` pair filter both measure it with this one definition.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# A response copies a persona sentence when it holds this share of the sentence's word pairs.
COPY_THRESHOLD = 0.8
_WORD = re.compile(r"[a-z0-9']+")


def word_pairs(text: str) -> set[tuple[str, str]]:
    """The set of adjacent lowercased word pairs of `text` (punctuation is not a word)."""
    words = _WORD.findall(text.lower())
    return set(zip(words, words[1:]))


def copy_shares(persona: Sequence[str], response: str) -> list[float | None]:
    """Per persona sentence, the share of its word pairs the response holds; None for a sentence of
    fewer than two words (it holds no pair, so it can be neither copied nor not)."""
    said = word_pairs(response)
    shares: list[float | None] = []
    for sentence in persona:
        pairs = word_pairs(sentence)
        shares.append(len(pairs & said) / len(pairs) if pairs else None)
    return shares


def persona_copy(persona: Sequence[str], response: str) -> float:
    """The largest share, over the persona's sentences, of a sentence's word pairs that the response
    also holds: 1 for a sentence repeated verbatim, 0 when no two adjacent words of any sentence
    reappear. Sentences of fewer than two words are skipped."""
    return max((share for share in copy_shares(persona, response) if share is not None), default=0.0)


def copied_sentence(persona: Sequence[str], response: str,
                    threshold: float = COPY_THRESHOLD) -> tuple[int, float] | None:
    """(index, share) of the persona sentence the response copies most, when that share is at least
    `threshold`; None when it copies none."""
    best = None
    for index, share in enumerate(copy_shares(persona, response)):
        if share is not None and share >= threshold and (best is None or share > best[1]):
            best = (index, share)
    return best
