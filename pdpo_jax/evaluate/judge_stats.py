"""Statistics of judged pairs: win/draw/lose counts, win rates with bootstrap intervals, position
consistency, and the seeded draw of tournament games.

Win rate (tournament and pairwise): (wins + 0.5 * draws) / games, per model, with a percentile
bootstrap confidence interval that resamples games. Unparsable and failed pairs are left out of
the counts and reported beside them.

The position-consistency rate is the share of pairs, among those with two valid verdicts, whose
two verdicts agree exactly.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from pdpo_jax.evaluate.judge_pairs import PairJudgment
from pdpo_jax.evaluate.judge_client import JudgeConfigError
from pdpo_jax.evaluate.judge_prompts import Outcome


OUTCOMES: tuple[Outcome, ...] = ("win", "draw", "lose")
DEFAULT_GAMES = 1000
WIN_RATE_CONVENTION = "win rate = (wins + 0.5 * draws) / games; unparsable and failed games are excluded"
SCORE: dict[Outcome, float] = {"win": 1.0, "draw": 0.5, "lose": 0.0}

__all__ = [
    "DEFAULT_GAMES", "OUTCOMES", "SCORE", "WIN_RATE_CONVENTION", "bootstrap_win_rates", "outcome_counts",
    "outcome_percentages", "pairwise_summary", "position_consistency", "sample_games", "status_counts",
    "tournament_summary",
]


def bootstrap_win_rates(
    scores: np.ndarray, played: np.ndarray, *, samples: int, seed: int, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap over games of each model's win rate.

    scores[g, m] is model m's score in game g (1 win, 0.5 draw, 0 loss), played[g, m] is 1 where m
    took part. Returns (low, high) per model; NaN where a model never played.
    """
    n_games = scores.shape[0]
    if n_games == 0 or samples < 1:
        nan = np.full(scores.shape[1], np.nan)
        return nan, nan.copy()
    rng = np.random.default_rng([seed, 2])
    # Each bootstrap sample as multiplicity weights over games (the same as resampling indices),
    # drawn in chunks so memory stays bounded for long tournaments.
    chunk = max(1, 4_000_000 // n_games)
    rates_chunks = []
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        weights = rng.multinomial(n_games, np.full(n_games, 1.0 / n_games), size=size).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            rates_chunks.append((weights @ scores) / (weights @ played))
    rates = np.concatenate(rates_chunks)
    tail = (1.0 - confidence) / 2 * 100
    low = np.full(scores.shape[1], np.nan)
    high = np.full(scores.shape[1], np.nan)
    for m in range(scores.shape[1]):
        column = rates[:, m][~np.isnan(rates[:, m])]
        if column.size:
            low[m], high[m] = np.percentile(column, [tail, 100 - tail])
    return low, high


def _none_if_nan(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def status_counts(judgments: Sequence[PairJudgment]) -> dict[str, int]:
    """How many pairs were requested, judged, unparsable or failed, and how many orders were re-asked."""
    return {
        "requested": len(judgments),
        "judged": sum(j.status == "ok" for j in judgments),
        "unparsable": sum(j.status == "unparsable" for j in judgments),
        "failed": sum(j.status == "failed" for j in judgments),
        "reasked_orders": sum(len(o.texts) > 1 for j in judgments for o in j.orders),
    }


def position_consistency(judgments: Sequence[PairJudgment]) -> dict[str, Any]:
    """How often the two orders agree exactly, and how often position 1 wins a decided single verdict."""
    both = [j for j in judgments if j.consistent is not None]
    singles = [o for j in judgments for o in j.orders if o.status == "ok"]
    decided = [o for o in singles if o.verdict in (1, 2)]
    first_wins = sum(o.verdict == 1 for o in decided)
    consistent = sum(bool(j.consistent) for j in both)
    return {
        "pairs": len(both),
        "consistent": consistent,
        "rate": consistent / len(both) if both else None,
        "first_position_win_rate": first_wins / len(decided) if decided else None,
        "decided_single_verdicts": len(decided),
    }


def outcome_counts(outcomes: Sequence[Outcome]) -> dict[str, int]:
    return {k: sum(o == k for o in outcomes) for k in OUTCOMES}


def outcome_percentages(counts: Mapping[str, int]) -> dict[str, float | None]:
    total = sum(counts.values())
    return {k: (100.0 * v / total if total else None) for k, v in counts.items()}


def pairwise_summary(
    judgments: Sequence[PairJudgment], model_a: str, model_b: str, *, bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Win/draw/lose of model A against model B (the paper's Table 3 layout) plus A's win rate with a CI."""
    outcomes = [j.outcome for j in judgments if j.outcome is not None]
    counts = outcome_counts(outcomes)
    score_a = np.array([SCORE[o] for o in outcomes])
    scores = np.stack([score_a, 1.0 - score_a], axis=1) if outcomes else np.zeros((0, 2))
    low, high = bootstrap_win_rates(scores, np.ones_like(scores), samples=bootstrap, seed=seed)
    rate = float(score_a.mean()) if outcomes else None
    return {
        "mode": "pairwise",
        "model_a": model_a,
        "model_b": model_b,
        "counts": counts,
        "percentages": outcome_percentages(counts),
        "status": status_counts(judgments),
        "position_consistency": position_consistency(judgments),
        "win_rate_a": {"value": rate, "ci_low": _none_if_nan(low[0]), "ci_high": _none_if_nan(high[0])},
        "win_rate_convention": WIN_RATE_CONVENTION,
    }


def sample_games(ids: Sequence[str], models: Sequence[str], games: int, seed: int) -> list[tuple[str, str, str]]:
    """`games` distinct (id, model A, model B) draws: a dialogue and two distinct models, seeded.

    Distinct (dialogue, unordered model pair) combinations, so no game is a copy of another; which
    model is A is a seeded coin flip.
    """
    if len(models) < 2:
        raise JudgeConfigError(f"a tournament needs at least two models, got {list(models)}")
    pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1 :]]
    total = len(ids) * len(pairs)
    if not 1 <= games <= total:
        raise JudgeConfigError(
            f"games must be between 1 and {total} ({len(ids)} shared dialogues x {len(pairs)} model pairs), got {games}"
        )
    rng = np.random.default_rng([seed, 3])
    picks = rng.choice(total, size=games, replace=False)
    swaps = rng.integers(0, 2, size=games)
    drawn = []
    for pick, swap in zip(picks, swaps):
        id_index, pair_index = divmod(int(pick), len(pairs))
        a, b = pairs[pair_index]
        drawn.append((ids[id_index], *((b, a) if swap else (a, b))))
    return drawn


def tournament_summary(
    judgments: Sequence[PairJudgment],
    models: Sequence[str],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Each model's win rate over the games it played, with bootstrap CIs, and the head-to-head table."""
    index = {m: i for i, m in enumerate(models)}
    decided = [j for j in judgments if j.outcome is not None]
    scores = np.zeros((len(decided), len(models)))
    played = np.zeros_like(scores)
    head_to_head = {a: {b: dict.fromkeys(OUTCOMES, 0) for b in models if b != a} for a in models}
    flip = {"win": "lose", "draw": "draw", "lose": "win"}
    for g, j in enumerate(decided):
        a, b, outcome = j.item.model_a, j.item.model_b, j.outcome
        score = SCORE[outcome]
        scores[g, index[a]], scores[g, index[b]] = score, 1.0 - score
        played[g, index[a]] = played[g, index[b]] = 1.0
        head_to_head[a][b][outcome] += 1
        head_to_head[b][a][flip[outcome]] += 1
    low, high = bootstrap_win_rates(scores, played, samples=bootstrap, seed=seed, confidence=confidence)
    rows = []
    for m, model in enumerate(models):
        record = {k: sum(head_to_head[model][o][k] for o in head_to_head[model]) for k in OUTCOMES}
        games = int(played[:, m].sum())
        rows.append(
            {
                "model": model,
                "games": games,
                "wins": record["win"],
                "draws": record["draw"],
                "losses": record["lose"],
                "win_rate": float(scores[:, m].sum() / games) if games else None,
                "ci_low": _none_if_nan(low[m]),
                "ci_high": _none_if_nan(high[m]),
            }
        )
    return {
        "mode": "tournament",
        "models": rows,
        "head_to_head": head_to_head,
        "status": status_counts(judgments),
        "position_consistency": position_consistency(judgments),
        "confidence": confidence,
        "bootstrap_samples": bootstrap,
        "win_rate_convention": WIN_RATE_CONVENTION,
    }
