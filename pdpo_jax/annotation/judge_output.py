"""A `pdpo judge` output folder as a human study reads it: the responses files the judge compared
(named in `judge_results.json`) and every pair it judged with its verdict (`judgments.jsonl`).

    read_judged_pairs("runs/x/judge")      # [JudgedPair(id, model_a, model_b, outcome), ...]
    judged_responses("runs/x/judge")       # the ResponseSet of every model the judge compared

A judge's outcome is from model A's side (win, draw, lose), None where its answers were
unparsable or its calls failed. Relative responses paths are read from the current folder, the
way the judge was given them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pdpo_jax.annotation.errors import StudyError
from pdpo_jax.evaluate.judge_pairs import ResponseSet, load_responses
from pdpo_jax.evaluate.judge_stats import OUTCOMES
from pdpo_jax.object_store import as_path, reported
from pdpo_jax.storage import jsonl_objects

RESULTS_FILE = "judge_results.json"
JUDGMENTS_FILE = "judgments.jsonl"


@dataclass(frozen=True)
class JudgedPair:
    id: str
    model_a: str
    model_b: str
    outcome: str | None  # from model A's side; None when the judge gave no usable verdict


def judgments_file(path: str | os.PathLike) -> Path:
    """A judge output folder's judgments.jsonl, or the judgments file itself."""
    path = as_path(path)
    with reported(path):
        file = path / JUDGMENTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise StudyError(f"{path}: not a judge output folder (no {JUDGMENTS_FILE}) nor a judgments file")
    return file


def read_judged_pairs(path: str | os.PathLike) -> list[JudgedPair]:
    """Every pair of a judge output folder (or its judgments.jsonl), in the judge's order."""
    pairs = []
    for where, row in jsonl_objects(judgments_file(path), StudyError):
        for key in ("id", "model_a", "model_b"):
            if not isinstance(row.get(key), str):
                raise StudyError(f"{where}: key {key!r} must be a string")
        outcome = row.get("outcome")
        if outcome is not None and outcome not in OUTCOMES:
            raise StudyError(f"{where}: key 'outcome' must be one of {list(OUTCOMES)} or null, got {outcome!r}")
        pairs.append(JudgedPair(str(row["id"]), str(row["model_a"]), str(row["model_b"]), outcome))
    if not pairs:
        raise StudyError(f"{judgments_file(path)}: no judged pairs")
    return pairs


def judged_responses(folder: str | os.PathLike) -> dict[str, ResponseSet]:
    """model -> its responses, for every responses file the judge of `folder` compared."""
    results = as_path(folder) / RESULTS_FILE
    if not results.is_file():
        raise StudyError(f"{folder}: not a judge output folder (no {RESULTS_FILE})")
    try:
        entries = json.loads(results.read_text(encoding="utf-8"))["responses"]
        named = [(str(entry["model"]), as_path(entry["path"])) for entry in entries]
    except (ValueError, KeyError, TypeError) as err:
        raise StudyError(f"{results}: not a judge results file (no 'responses' list of model and path: {err})") from None
    sets = {}
    for model, path in named:
        if not path.is_file():
            raise StudyError(f"{results}: the responses file of {model!r}, {path}, is not there (relative paths are "
                             f"read from the current folder, as the judge was given them)")
        responses = load_responses(path)
        if responses.model != model:
            raise StudyError(f"{path}: names its model {responses.model!r}, but the judge compared it as {model!r}")
        sets[model] = responses
    return sets
