"""How far votes agree: each item's majority outcome, the share of items on which people and the
judge agree, and agreement among annotators (Krippendorff's alpha, Fleiss' kappa).

Every outcome is from model A's side of the item: win (A is better), draw, lose. Annotator
agreement treats the three as nominal categories; Krippendorff's alpha comes from `krippendorff`,
Fleiss' kappa from statsmodels.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import krippendorff
import numpy as np

from pdpo_jax.annotation.store import DRAW
from pdpo_jax.evaluate.judge_stats import OUTCOMES

MAJORITY_RULE = ("an item's human outcome is the one most of its votes name; when two or more outcomes tie for "
                 "the most votes, the item is a draw")


def outcome_of_vote(winner: str, model_a: str, model_b: str) -> str:
    """A vote's winner (a model name or "draw") as model A's outcome."""
    if winner == DRAW:
        return DRAW
    if winner == model_a:
        return "win"
    if winner == model_b:
        return "lose"
    raise ValueError(f"vote winner {winner!r} is neither {model_a!r}, {model_b!r} nor 'draw'")


def majority_outcome(outcomes: Sequence[str]) -> str | None:
    """The outcome most of `outcomes` name (a tie for the most is a draw); None without any."""
    if not outcomes:
        return None
    ranked = Counter(outcomes).most_common()
    top = [outcome for outcome, count in ranked if count == ranked[0][1]]
    return top[0] if len(top) == 1 else DRAW


def agreement(pairs: Sequence[tuple[str, str]], *, without_draws: bool = False) -> dict[str, Any]:
    """How many (human, judge) outcome pairs agree; `without_draws` keeps only the items on which
    both people and judge chose a side."""
    kept = [(h, j) for h, j in pairs if not (without_draws and DRAW in (h, j))]
    agree = sum(h == j for h, j in kept)
    return {"agree": agree, "items": len(kept), "rate": agree / len(kept) if kept else None}


def krippendorff_alpha(ratings: Sequence[Mapping[str, str]]) -> float | None:
    """Nominal alpha over items (one {annotator: outcome} mapping each); a missing vote is missing
    data. None where it is undefined (no item with two votes, or a single outcome throughout)."""
    annotators = sorted({name for item in ratings for name in item})
    if not annotators or not ratings:
        return None
    code = {outcome: float(i) for i, outcome in enumerate(OUTCOMES)}
    matrix = np.full((len(annotators), len(ratings)), np.nan)
    row = {name: i for i, name in enumerate(annotators)}
    for column, item in enumerate(ratings):
        for name, outcome in item.items():
            matrix[row[name], column] = code[outcome]
    if not any(np.sum(~np.isnan(matrix[:, column])) >= 2 for column in range(matrix.shape[1])):
        return None
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 when every vote is the same: undefined, None below
        alpha = krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal",
                                   value_domain=list(code.values()))
    return None if not np.isfinite(alpha) else float(alpha)


def fleiss_kappa(ratings: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Fleiss' kappa over items (the outcomes of each one's votes). It needs the same number of
    votes on every item, so it is computed over the items with the most common number of votes
    (at least two; on a tie, the larger number); the result says how many items and votes that is."""
    from statsmodels.stats.inter_rater import fleiss_kappa as statsmodels_fleiss_kappa  # slow to import: here only

    counts = Counter(len(item) for item in ratings if len(item) >= 2)
    if not counts:
        return {"value": None, "items": 0, "votes_per_item": None}
    votes = max(counts, key=lambda n: (counts[n], n))
    table = np.array([[Counter(item)[outcome] for outcome in OUTCOMES] for item in ratings if len(item) == votes])
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = statsmodels_fleiss_kappa(table, method="fleiss")
    return {"value": float(kappa) if np.isfinite(kappa) else None, "items": len(table), "votes_per_item": votes}
