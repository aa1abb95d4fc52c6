"""The Dialogue NLI evaluation set (Welleck et al. 2019): candidate re-ranking by category.

Each JSON line holds `persona`, `prefix` (the history, oldest first, ending with the partner line
being answered), `candidates` {label, neg, similar, rand}, and optionally `eval_labels`, `triple`
and `relevant_persona_sentence`. Any file of that format is read (Haves, Likes, Attributes, ...).

Candidate groups map to the reported categories: label -> "hits" (the gold response),
neg -> "contradict", similar -> "entail", rand -> "rand". Protocol "31" keeps the gold plus the
first 10 of each other group (Kim et al. 2020); protocol "all" keeps every candidate in the file.
The gold candidate always comes first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pdpo_jax.data.fields import string_list
from pdpo_jax.errors import DataError
from pdpo_jax.storage import json_lines

CATEGORY_OF_GROUP = {"label": "hits", "neg": "contradict", "similar": "entail", "rand": "rand"}
CATEGORIES = tuple(CATEGORY_OF_GROUP.values())
PROTOCOLS = ("31", "all")
_PER_GROUP_31 = 10


@dataclass(frozen=True)
class DnliExample:
    id: str
    persona: tuple[str, ...]
    history: tuple[str, ...]
    candidates: tuple[tuple[str, str], ...]  # (text, category); the gold ("hits") first
    relevant_persona_sentence: str | None = None
    triple: tuple[str, ...] | None = None
    source: str = ""

    @property
    def gold(self) -> str:
        return self.candidates[0][0]


def read_dnli(path: str | Path, protocol: str = "31") -> list[DnliExample]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    stem = Path(path).stem
    examples = [_example(record, path, number, protocol, f"{stem}:{i}") for i, (number, record) in enumerate(json_lines(path))]
    if not examples:
        raise DataError(path, None, "no DNLI examples in file")
    return examples


def _example(record: dict, path: str | Path, number: int, protocol: str, example_id: str) -> DnliExample:
    persona = string_list(record.get("persona"), path, number, "persona")
    history = string_list(record.get("prefix"), path, number, "prefix")
    groups = record.get("candidates")
    if not isinstance(groups, dict) or not groups:
        raise DataError(path, number, "row without candidates")
    candidates: list[tuple[str, str]] = []
    for group, category in CATEGORY_OF_GROUP.items():
        if group not in groups:
            raise DataError(path, number, f"candidates has no {group!r} group")
        texts = string_list(groups[group], path, number, f"candidates.{group}", allow_empty=group != "label")
        if group == "label":
            texts = texts[:1]
        elif protocol == "31":
            if len(texts) < _PER_GROUP_31:
                raise DataError(path, number, f"candidates.{group} has {len(texts)} entries; protocol '31' needs {_PER_GROUP_31}")
            texts = texts[:_PER_GROUP_31]
        candidates.extend((text, category) for text in texts)
    relevant = record.get("relevant_persona_sentence")
    triple = record.get("triple")
    return DnliExample(
        id=example_id,
        persona=persona,
        history=history,
        candidates=tuple(candidates),
        relevant_persona_sentence=relevant.strip() if isinstance(relevant, str) else None,
        triple=tuple(str(part) for part in triple) if isinstance(triple, list) else None,
        source=str(path),
    )
