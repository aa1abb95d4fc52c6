"""A JSON-serializable summary of a data file: its format (told by content), counts, first example.

    inspect_file("valid_havenot.jsonl")
    # {"path": ..., "format": "dnli", "protocol": "31", "counts": {"examples": 268, ...},
    #  "first_example": {"id": ..., "persona": [...], "history": [...], "candidates": [...]}}

Formats: the dialogue formats of `load_dialogues` ("fbdialog", "hf", "jsonl", "jpersonachat",
"parallel"), "dnli" (the DNLI evaluation set, read under `protocol`) and "nli-pairs".
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pdpo_jax.data.dnli import CATEGORIES, PROTOCOLS, read_dnli
from pdpo_jax.data.examples import examples_from_dialogues
from pdpo_jax.data.loading import detect_format, load_dialogues
from pdpo_jax.data.nli_pairs import NLI_LABELS, nli_pairs_layout, read_nli_pairs
from pdpo_jax.data.parallel_text import is_parallel_file
from pdpo_jax.errors import DataError
from pdpo_jax.object_store import as_path, reported
from pdpo_jax.storage import json_records, text_lines

DNLI = "dnli"
NLI_PAIRS = "nli-pairs"
_FBDIALOG_LINE = re.compile(r"\d+ ")


def inspect_files(paths: Iterable[str | Path], protocol: str = "31") -> list[dict[str, Any]]:
    return [inspect_file(path, protocol) for path in paths]


def inspect_file(path: str | Path, protocol: str = "31") -> dict[str, Any]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    format_name = file_format(path)
    summary: dict[str, Any] = {"path": str(path), "format": format_name}
    if format_name == DNLI:
        summary.update(protocol=protocol, **_dnli_summary(path, protocol))
    elif format_name == NLI_PAIRS:
        summary.update(_nli_pairs_summary(path))
    else:
        summary.update(_dialogue_summary(path, format_name))
    return _jsonable(summary)


def file_format(path: str | Path) -> str:
    """DNLI and NLI-pair files by their first record; everything else through `detect_format`."""
    path = as_path(path)
    with reported(path):
        is_file = path.is_file()
    if not is_file or is_parallel_file(path):
        return detect_format(path)
    try:
        first_line = next((line for _, line in text_lines(path) if line.strip()), None)
    except DataError:
        return detect_format(path)  # not UTF-8 text (a workbook, say): told by its extension
    if first_line is None:
        raise DataError(path, None, "empty file")
    layout = nli_pairs_layout(path)
    if layout == "text":
        return NLI_PAIRS
    if layout == "json":
        keys = _first_record_keys(path)
        if {"prefix", "candidates"} <= keys:
            return DNLI
        if {"sentence1", "sentence2", "label"} <= keys:
            return NLI_PAIRS
    format_name = detect_format(path)
    if format_name == "fbdialog" and not _FBDIALOG_LINE.match(first_line):
        raise DataError(path, None, "unknown format: not FbDialog, line-aligned PersonaChat, NLI pairs or DNLI")
    return format_name


def _first_record_keys(path: Path) -> set[str]:
    try:
        for _, _, record in json_records(path):
            return set(record)
    except DataError:
        pass  # not one JSON value a line (a pretty-printed .json, say): detect_format decides
    return set()


def _dialogue_summary(path: str | Path, format_name: str) -> dict[str, Any]:
    dialogues = load_dialogues(path, format=format_name)
    examples = examples_from_dialogues(dialogues)
    counts = {
        "dialogues": len(dialogues),
        "persona_lines": sum(len(d.persona) for d in dialogues),
        "turns": sum(len(d.turns) for d in dialogues),  # utterances of both speakers
        "examples": len(examples),  # the model's turns
    }
    return {"counts": counts, "first_example": asdict(examples[0]) if examples else None}


def _dnli_summary(path: str | Path, protocol: str) -> dict[str, Any]:
    examples = read_dnli(path, protocol)
    per_category = {category: [sum(c == category for _, c in e.candidates) for e in examples] for category in CATEGORIES}
    counts = {
        "examples": len(examples),
        "candidates": _spread([len(e.candidates) for e in examples]),
        "categories": {category: _spread(sizes) for category, sizes in per_category.items()},
    }
    first = examples[0]
    first_example = {
        "id": first.id,
        "persona": first.persona,
        "history": first.history,
        "candidates": [{"text": text, "category": category} for text, category in first.candidates],
        "relevant_persona_sentence": first.relevant_persona_sentence,
        "triple": first.triple,
    }
    return {"counts": counts, "first_example": first_example}


def _nli_pairs_summary(path: str | Path) -> dict[str, Any]:
    pairs = read_nli_pairs(path)
    labels = Counter(pair.label for pair in pairs)
    counts = {"pairs": len(pairs), "labels": {label: labels[label] for label in NLI_LABELS}}
    return {"counts": counts, "first_example": asdict(pairs[0])}


def _spread(values: list[int]) -> dict[str, int | float]:
    """Total, min, max and mean of per-example counts."""
    return {"total": sum(values), "min": min(values), "max": max(values), "mean": round(sum(values) / len(values), 3)}


def _jsonable(value: Any) -> Any:
    """Tuples as lists, all the way down, so the summary compares equal to its JSON round trip."""
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value
