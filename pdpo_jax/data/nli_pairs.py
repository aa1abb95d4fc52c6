"""Dialogue NLI sentence pairs (Welleck et al. 2019), the training data of a consistency classifier.

Two layouts, told apart by content:

* text, one pair a line: `sentence1</s>sentence2</s>label` (the layout of RCDG's `nli-train.txt`);
* JSON, as in the official `dialogue_nli_*.jsonl` release: objects with `sentence1`, `sentence2` and
  `label`, one a line or gathered in JSON arrays (the official files are one array on one line).
  Of the other fields (`triple1`, `triple2`, `dtype`, `id`) only `id` is kept.

DNLI labels positive / neutral / negative mean entailment / neutral / contradiction; the standard
NLI names are accepted too. Pairs without an id get `<file stem>:<ordinal>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pdpo_jax.errors import DataError
from pdpo_jax.storage import json_records, text_lines

NLI_LABELS = ("contradiction", "neutral", "entailment")  # the classifier's class order
LABEL_OF_NAME = {
    "negative": "contradiction",
    "neutral": "neutral",
    "positive": "entailment",
    **{label: label for label in NLI_LABELS},
}
FIELD_SEPARATOR = "</s>"
JSON_KEYS = ("sentence1", "sentence2", "label")


@dataclass(frozen=True)
class NliPair:
    sentence1: str
    sentence2: str
    label: str  # one of NLI_LABELS
    id: str

    @property
    def label_index(self) -> int:
        return NLI_LABELS.index(self.label)


def read_nli_pairs(path: str | Path) -> list[NliPair]:
    layout = nli_pairs_layout(path)
    if layout is None:
        expected = FIELD_SEPARATOR.join(("sentence1", "sentence2", "label"))
        raise DataError(path, None, f"not NLI sentence pairs: expected {expected!r} lines or JSON objects")
    pairs = _text_pairs(path) if layout == "text" else _json_pairs(path)
    if not pairs:
        raise DataError(path, None, "no sentence pairs in file")
    return pairs


def nli_pairs_layout(path: str | Path) -> str | None:
    """"text" or "json" from the first non-blank line, or None when it is neither (or the file is empty)."""
    for _, line in text_lines(path):
        if not line.strip():
            continue
        if line.lstrip().startswith(("{", "[")):
            return "json"
        fields = line.split(FIELD_SEPARATOR)
        return "text" if len(fields) == 3 and fields[2].strip().lower() in LABEL_OF_NAME else None
    return None


def _text_pairs(path: str | Path) -> list[NliPair]:
    stem = Path(path).stem
    pairs = []
    for number, line in text_lines(path):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(FIELD_SEPARATOR)]
        if len(fields) != 3:
            raise DataError(path, number, f"expected 3 fields separated by '{FIELD_SEPARATOR}', found {len(fields)}")
        pairs.append(_pair(*fields, f"{stem}:{len(pairs)}", path, number, ""))
    return pairs


def _json_pairs(path: str | Path) -> list[NliPair]:
    stem = Path(path).stem
    pairs = []
    for number, position, record in json_records(path):
        where = "" if position is None else f"item {position} of the array: "
        values = []
        for key in JSON_KEYS:
            if not isinstance(record.get(key), str):
                raise DataError(path, number, f"{where}{key!r} must be a string")
            values.append(record[key].strip())
        given_id = record.get("id")
        pair_id = f"{stem}:{len(pairs)}" if given_id is None else str(given_id)
        pairs.append(_pair(*values, pair_id, path, number, where))
    return pairs


def _pair(sentence1: str, sentence2: str, name: str, pair_id: str, path: str | Path, number: int, where: str) -> NliPair:
    label = LABEL_OF_NAME.get(name.lower())
    if label is None:
        raise DataError(path, number, f"{where}unknown label {name!r}; expected one of {sorted(LABEL_OF_NAME)}")
    for key, sentence in (("sentence1", sentence1), ("sentence2", sentence2)):
        if not sentence:
            raise DataError(path, number, f"{where}empty {key}")
    return NliPair(sentence1, sentence2, label, pair_id)
