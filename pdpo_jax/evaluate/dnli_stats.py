"""Uncertainty of DNLI shares, and paired tests of models evaluated on the same examples.

Inputs are the per-example records `eval-dnli` writes (REPORT.examples.jsonl): which category each
example's top-ranked candidate belongs to. For every model, subset and `overall`:

* **Shares**: `n`, the counts and the percentages of hits / entail / rand / contradict (they sum to
  100), the same numbers the report holds.
* **Intervals**: 95% percentile-bootstrap intervals of each percentage, resampling examples with
  replacement (`samples` resamples, seed `seed`). A subset's rows resample within that subset;
  `overall` resamples within each subset separately (stratified), so every resample keeps the
  subset sizes of the evaluation, as the evaluation itself fixed them, and the overall share stays
  the same size-weighted mix of the subsets. All models use the same resampled indices.
* **Paired tests against a reference model** (SFT in the paper), for Hits@1 and Contradict@1: on
  the same examples, `model_only` is the number of examples where the model's top candidate has
  that category and the reference's does not, `reference_only` the reverse. The exact two-sided
  McNemar test asks whether these discordant examples split evenly: p = min(1, 2 P(X <= min(b, c)))
  with X ~ Binomial(b + c, 1/2), and p = 1 when no example is discordant. Beside it, the paired
  difference (model - reference) in percentage points with a paired bootstrap interval (the
  same resampled examples for both models; stratified for `overall`).

    preds = [predictions_from_records(name, records, source) for ...]
    stats = dnli_statistics(preds, reference="sft")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pdpo_jax.data.dnli import CATEGORIES
from pdpo_jax.errors import PdpoError

OVERALL = "overall"
PAIRED_CATEGORIES = ("hits", "contradict")  # the paper's two headline metrics
DEFAULT_SAMPLES = 10_000

__all__ = [
    "DEFAULT_SAMPLES", "OVERALL", "PAIRED_CATEGORIES", "DnliStatsError", "ModelPredictions", "bootstrap_indices",
    "dnli_statistics", "mcnemar_exact", "percentile_interval", "predictions_from_records",
]


class DnliStatsError(PdpoError):
    """Per-example records that cannot be compared; the message names the file."""


@dataclass(frozen=True)
class ModelPredictions:
    """One model's top-ranked category per example, in the order of `ids`."""

    name: str
    source: str  # the file the records came from, for error messages
    ids: tuple[str, ...]
    subsets: tuple[str, ...]
    predicted: tuple[str, ...]

    def aligned_to(self, ids: Sequence[str]) -> "ModelPredictions":
        position = {example_id: i for i, example_id in enumerate(self.ids)}
        order = [position[example_id] for example_id in ids]
        return ModelPredictions(self.name, self.source, tuple(ids), tuple(self.subsets[i] for i in order),
                                tuple(self.predicted[i] for i in order))


def predictions_from_records(name: str, records: Sequence[dict[str, Any]], source: str) -> ModelPredictions:
    """Checks the fields the statistics need (`id`, `subset`, `predicted_category`) and that ids are unique."""
    ids, subsets, predicted = [], [], []
    seen: set[str] = set()
    for number, record in enumerate(records, 1):
        where = f"{source}: record {number}"
        for key in ("id", "subset", "predicted_category"):
            if not isinstance(record.get(key), str):
                raise DnliStatsError(f"{where}: missing or non-string {key!r}")
        if record["predicted_category"] not in CATEGORIES:
            raise DnliStatsError(f"{where}: predicted_category {record['predicted_category']!r} is not one of {list(CATEGORIES)}")
        if record["id"] in seen:
            raise DnliStatsError(f"{where}: example id {record['id']!r} appears twice")
        seen.add(record["id"])
        ids.append(record["id"])
        subsets.append(record["subset"])
        predicted.append(record["predicted_category"])
    if not ids:
        raise DnliStatsError(f"{source}: no example records")
    return ModelPredictions(name, source, tuple(ids), tuple(subsets), tuple(predicted))


# --------------------------------------------------------------------------------------------
# The two tools


def mcnemar_exact(model_only: int, reference_only: int) -> float:
    """Exact two-sided McNemar p-value from the two discordant counts (a binomial test at 1/2)."""
    if model_only < 0 or reference_only < 0:
        raise ValueError(f"discordant counts must be non-negative, got {model_only}, {reference_only}")
    n = model_only + reference_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(model_only, reference_only) + 1))
    return min(1.0, 2 * tail / 2**n)  # integer arithmetic, one rounding at the end


def bootstrap_indices(strata: Sequence[str], samples: int, seed: int) -> np.ndarray:
    """`[samples, n]` example indices drawn with replacement within each stratum: every resample
    keeps each stratum's size and places its draws where the stratum's examples are."""
    labels = np.asarray(strata)
    rng = np.random.default_rng([seed, 14])
    indices = np.empty((samples, labels.size), dtype=np.int64)
    for stratum in dict.fromkeys(strata):  # first-seen order, so the draws do not depend on sorting
        members = np.flatnonzero(labels == stratum)
        indices[:, members] = members[rng.integers(0, members.size, size=(samples, members.size))]
    return indices


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


# --------------------------------------------------------------------------------------------
# Statistics of several models


def _check_same_examples(models: Sequence[ModelPredictions]) -> None:
    first = models[0]
    for other in models[1:]:
        if set(other.ids) != set(first.ids):
            missing = sorted(set(first.ids) - set(other.ids))
            extra = sorted(set(other.ids) - set(first.ids))
            raise DnliStatsError(
                f"{other.source} and {first.source} hold different examples ({len(other.ids)} vs {len(first.ids)}; "
                f"e.g. missing {missing[:3]}, extra {extra[:3]}): paired statistics need the same examples"
            )
        aligned = other.aligned_to(first.ids)
        for example_id, a, b in zip(first.ids, first.subsets, aligned.subsets):
            if a != b:
                raise DnliStatsError(f"{other.source}: example {example_id!r} is in subset {b!r}, in {first.source} in {a!r}")


def _group_row(hit: dict[str, np.ndarray], members: np.ndarray, draws: np.ndarray, confidence: float) -> dict[str, Any]:
    n = int(members.size)
    counts = {c: int(hit[c][members].sum()) for c in CATEGORIES}
    return {
        "n": n,
        "counts": counts,
        "percentages": {c: 100.0 * counts[c] / n for c in CATEGORIES},
        "intervals": {c: percentile_interval(100.0 * hit[c][draws].mean(axis=1), confidence) for c in CATEGORIES},
    }


def _paired(hit: dict[str, np.ndarray], ref: dict[str, np.ndarray], members: np.ndarray, draws: np.ndarray,
            confidence: float) -> dict[str, Any]:
    paired = {}
    for c in PAIRED_CATEGORIES:
        a, b = hit[c][members], ref[c][members]
        model_only, reference_only = int(np.sum(a & ~b)), int(np.sum(b & ~a))
        difference = hit[c].astype(np.float64) - ref[c]
        paired[c] = {
            "difference": 100.0 * float(difference[members].mean()),
            "interval": percentile_interval(100.0 * difference[draws].mean(axis=1), confidence),
            "model_only": model_only,
            "reference_only": reference_only,
            "p_value": mcnemar_exact(model_only, reference_only),
        }
    return paired


def dnli_statistics(models: Sequence[ModelPredictions], reference: str, *, samples: int = DEFAULT_SAMPLES,
                    seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Shares, intervals and paired tests (see the module docstring) for every model, subset and overall.

    Returns `{"subsets", "reference", "confidence", "bootstrap_samples", "seed", "models": [{"name",
    "source", "groups": {subset or "overall": {"n", "counts", "percentages", "intervals", "paired"}}}]}`;
    intervals are `(low, high)` in percent, and `paired` is `{"hits": None, "contradict": None}` for the
    reference itself. Models must hold the same example ids, each in the same subset.
    """
    if not models:
        raise DnliStatsError("no models to compare")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise DnliStatsError(f"model names must be distinct, got {names}")
    if reference not in names:
        raise DnliStatsError(f"the reference {reference!r} is not among the models {names}")
    if samples < 1 or not 0 < confidence < 1:
        raise DnliStatsError(f"need samples >= 1 and 0 < confidence < 1, got {samples}, {confidence}")
    _check_same_examples(models)
    ids = models[0].ids
    models = [m.aligned_to(ids) for m in models]
    subsets = list(dict.fromkeys(models[0].subsets))
    labels = np.asarray(models[0].subsets)
    groups = {s: np.flatnonzero(labels == s) for s in subsets}
    groups[OVERALL] = np.arange(len(ids))
    # Subset rows resample within the subset (a stratum of its own); overall within every subset.
    draws = {s: members[bootstrap_indices([s] * members.size, samples, seed)] for s, members in groups.items() if s != OVERALL}
    draws[OVERALL] = bootstrap_indices(models[0].subsets, samples, seed)
    hits = {m.name: {c: np.asarray(m.predicted) == c for c in CATEGORIES} for m in models}
    rows = []
    for m in models:
        row_groups = {}
        for group, members in groups.items():
            row = _group_row(hits[m.name], members, draws[group], confidence)
            row["paired"] = (dict.fromkeys(PAIRED_CATEGORIES) if m.name == reference
                             else _paired(hits[m.name], hits[reference], members, draws[group], confidence))
            row_groups[group] = row
        rows.append({"name": m.name, "source": m.source, "groups": row_groups})
    return {"subsets": subsets, "reference": reference, "confidence": confidence, "bootstrap_samples": samples,
            "seed": seed, "models": rows}
