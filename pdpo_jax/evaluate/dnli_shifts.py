"""How a second model moved the DNLI candidate scores of a first one, category by category.

From the per-example records of two models on the same examples (REPORT.examples.jsonl): per
category, the mean change of the candidates' summed log-likelihood (`logps`, whatever the ranking
score was), the same relative to the gold response's change, and each model's mean rank of the
gold. Argmax shares move only once these shifts pass each other, so they show the direction of
small updates that the Hits/Contradict shares cannot see yet.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from pdpo_jax.evaluate.report import DNLI_METRICS, _table
from pdpo_jax.errors import PdpoError

__all__ = ["ScoreShiftError", "score_shifts", "score_shifts_markdown"]


class ScoreShiftError(PdpoError):
    """Records whose candidates cannot be compared; the message names the file and example."""


def _by_id(records: Sequence[Mapping[str, Any]], source: str) -> dict[str, Mapping[str, Any]]:
    rows = {}
    for number, record in enumerate(records, 1):
        for key, kind in (("id", str), ("categories", list), ("logps", list), ("gold_rank", int)):
            if not isinstance(record.get(key), kind):
                raise ScoreShiftError(f"{source}: record {number}: missing or malformed {key!r}")
        if len(record["categories"]) != len(record["logps"]):
            raise ScoreShiftError(f"{source}: record {number}: {len(record['categories'])} categories but "
                                  f"{len(record['logps'])} logps")
        rows[record["id"]] = record
    return rows


def score_shifts(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], *,
                 before_source: str = "before", after_source: str = "after") -> dict[str, Any]:
    """Mean change (after - before) of the summed log-likelihood per candidate category, over the
    examples both hold; candidates are matched by position, so each example's categories must agree."""
    a, b = _by_id(before, before_source), _by_id(after, after_source)
    common = sorted(set(a) & set(b))
    if not common:
        raise ScoreShiftError(f"{before_source} and {after_source} have no example ids in common")
    shifts: dict[str, list[float]] = {key: [] for key, _, _ in DNLI_METRICS}
    for example_id in common:
        old, new = a[example_id], b[example_id]
        if old["categories"] != new["categories"]:
            raise ScoreShiftError(f"example {example_id!r} has other candidates in {after_source} than in {before_source} "
                                  "(a different protocol or data file?)")
        for category, old_logp, new_logp in zip(old["categories"], old["logps"], new["logps"]):
            shifts.setdefault(category, []).append(float(new_logp) - float(old_logp))
    gold = float(np.mean(shifts["hits"]))
    categories = {
        category: {"candidates": len(values), "mean_change": float(np.mean(values)) if values else None,
                   "change_vs_gold": float(np.mean(values)) - gold if values else None}
        for category, values in shifts.items()
    }
    return {
        "examples": len(common),
        "categories": categories,
        "mean_gold_rank": {"before": float(np.mean([a[i]["gold_rank"] for i in common])),
                           "after": float(np.mean([b[i]["gold_rank"] for i in common]))},
    }


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.4f}"


def score_shifts_markdown(shifts: Mapping[str, Any], before: str = "before", after: str = "after") -> str:
    """The table of one `score_shifts` result, with a line on the examples and the gold's mean rank."""
    rows = [[category, str(v["candidates"]), _signed(v["mean_change"]), _signed(v["change_vs_gold"])]
            for category, v in shifts["categories"].items()]
    ranks = shifts["mean_gold_rank"]
    return (
        f"{shifts['examples']} examples; mean change of summed log-likelihood ({after} - {before}):\n\n"
        + _table(["category", "candidates", "mean change", "change vs. gold"], rows) + "\n\n"
        + f"mean gold rank (1 = first of the candidates): {before} {ranks['before']:.2f}, {after} {ranks['after']:.2f}\n"
    )
