"""The report of a human study, beside the LLM judge's verdicts on the same pairs:

* per pair of models, the paper's Table 3: each item's human majority outcome counted as win /
  draw / lose of model A against model B, and the judge's outcomes on the same items;
* agreement between the human majority and the judge, over every item both have an outcome for,
  and over the items where neither chose a draw;
* agreement among annotators: Krippendorff's alpha and Fleiss' kappa (nominal win / draw / lose);
* a bar plot of the human and judge shares.

    report = study_report(Study("study.db"), judge="runs/x/judge")
    write_report(report, "report.json")   # report.json, report.md, report.png

Only each annotator's current vote counts (a changed vote counts as its last choice).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

from pdpo_jax.annotation.agreement import (
    MAJORITY_RULE,
    agreement,
    fleiss_kappa,
    krippendorff_alpha,
    majority_outcome,
    outcome_of_vote,
)
from pdpo_jax.annotation.errors import StudyError
from pdpo_jax.annotation.judge_output import read_judged_pairs
from pdpo_jax.annotation.store import Study
from pdpo_jax.evaluate.judge_stats import OUTCOMES, outcome_counts, outcome_percentages
from pdpo_jax.evaluate.report import plot_outcome_shares
from pdpo_jax.object_store import as_path
from pdpo_jax.storage import atomic_write_json, atomic_write_text

FLIPPED = {"win": "lose", "draw": "draw", "lose": "win"}


def judge_outcomes(judge: str | os.PathLike) -> dict[tuple[str, str, str], str | None]:
    """(id, model A, model B) -> the judge's outcome from A's side, in both orders of the models."""
    outcomes: dict[tuple[str, str, str], str | None] = {}
    for pair in read_judged_pairs(judge):
        outcomes[(pair.id, pair.model_a, pair.model_b)] = pair.outcome
        outcomes.setdefault((pair.id, pair.model_b, pair.model_a), None if pair.outcome is None else FLIPPED[pair.outcome])
    return outcomes


def study_report(study: Study, judge: str | os.PathLike | None = None) -> dict[str, Any]:
    votes = study.votes()
    history = study.votes(history=True)
    verdicts = judge_outcomes(judge) if judge is not None else None
    by_item: dict[int, dict[str, str]] = defaultdict(dict)
    items = dict(study.items())
    for vote in votes:
        item = items[vote.item]
        by_item[vote.item][vote.annotator] = outcome_of_vote(vote.winner, item.model_a, item.model_b)
    if verdicts is not None and not any((i.id, i.model_a, i.model_b) in verdicts for i in items.values()):
        raise StudyError(f"{judge}: the judge output holds none of the study's pairs")

    rows = []
    for number, item in items.items():
        outcomes = by_item.get(number, {})
        row = {"item": number, "id": item.id, "model_a": item.model_a, "model_b": item.model_b,
               "votes": outcome_counts(list(outcomes.values())), "human": majority_outcome(list(outcomes.values()))}
        if verdicts is not None:
            row["judge"] = verdicts.get((item.id, item.model_a, item.model_b))
        rows.append(row)
    voted = [row for row in rows if row["human"] is not None]

    pairs = []
    for models in dict.fromkeys((row["model_a"], row["model_b"]) for row in voted):
        mine = [row for row in voted if (row["model_a"], row["model_b"]) == models]
        entry = {"model_a": models[0], "model_b": models[1], "items": len(mine), "human": _shares(r["human"] for r in mine)}
        if verdicts is not None:
            judged = [row["judge"] for row in mine if row["judge"] is not None]
            entry["judge"] = {**_shares(judged), "items": len(judged)}
        pairs.append(entry)

    both = [(row["human"], row["judge"]) for row in voted if row.get("judge") is not None]
    ratings = [by_item[row["item"]] for row in voted]
    return {
        "study": {"db": str(study.path), "items": len(items), "items_voted": len(voted),
                  "annotators": len(study.annotator_names()),
                  "annotators_voted": len({vote.annotator for vote in votes}), "votes": len(votes),
                  "changed_votes": len(history) - len(votes), "judge": None if judge is None else str(judge)},
        "majority_rule": MAJORITY_RULE,
        "pairs": pairs,
        "human_judge_agreement": None if verdicts is None else {
            "with_draws": agreement(both), "without_draws": agreement(both, without_draws=True)},
        "annotator_agreement": {
            "coding": "nominal: win / draw / lose of model A",
            "krippendorff_alpha": krippendorff_alpha(ratings),
            "fleiss_kappa": fleiss_kappa([list(r.values()) for r in ratings]),
        },
        "items": rows,
    }


def _shares(outcomes) -> dict[str, Any]:
    counts = outcome_counts(list(outcomes))
    return {"counts": counts, "percentages": outcome_percentages(counts)}


def _cell(shares: Mapping[str, Any] | None, outcome: str) -> str:
    if shares is None or shares["percentages"][outcome] is None:
        return "n/a"
    return f"{shares['percentages'][outcome]:.1f} ({shares['counts'][outcome]})"


def _rate(entry: Mapping[str, Any]) -> str:
    rate = entry["rate"]
    return "n/a" if rate is None else f"{100 * rate:.1f}% ({entry['agree']} of {entry['items']} items)"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def report_markdown(report: Mapping[str, Any]) -> str:
    study, has_judge = report["study"], report["human_judge_agreement"] is not None
    header = ["model A", "model B", "items", "human win (%)", "human draw (%)", "human lose (%)"]
    if has_judge:
        header += ["judge win (%)", "judge draw (%)", "judge lose (%)"]
    lines = ["| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * (len(header) - 2)]
    for pair in report["pairs"]:
        cells = [pair["model_a"], pair["model_b"], str(pair["items"]), *(_cell(pair["human"], o) for o in OUTCOMES)]
        if has_judge:
            cells += [_cell(pair["judge"], o) for o in OUTCOMES]
        lines.append("| " + " | ".join(cells) + " |")
    kappa = report["annotator_agreement"]["fleiss_kappa"]
    text = [
        "### Human evaluation", "",
        f"{study['items_voted']} of {study['items']} items voted on by "
        f"{study.get('annotators_voted', study['annotators'])} of {study['annotators']} annotators "
        f"({study['votes']} votes; {study['changed_votes']} earlier votes were changed). Win / draw / lose is "
        f"model A's outcome against model B; {report['majority_rule']}.", "",
        *lines, "",
    ]
    if has_judge:
        agreed = report["human_judge_agreement"]
        text += [f"Human majority and judge agree on {_rate(agreed['with_draws'])}; leaving out the items either "
                 f"called a draw, on {_rate(agreed['without_draws'])}.", ""]
    votes_per_item = "" if kappa["votes_per_item"] is None else \
        f" over the {kappa['items']} items with {kappa['votes_per_item']} votes"
    text += [f"Agreement among annotators: Krippendorff's alpha "
             f"{_number(report['annotator_agreement']['krippendorff_alpha'])}, Fleiss' kappa "
             f"{_number(kappa['value'])}{votes_per_item}.", ""]
    return "\n".join(text)


def plot_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    rows = []
    for pair in report["pairs"]:
        label = f"{pair['model_a']} vs {pair['model_b']}"
        for who in ("human", "judge"):
            if who in pair:
                counts = pair[who]["counts"]
                rows.append((f"{who}: {label}", counts["win"], counts["draw"], counts["lose"]))
    return plot_outcome_shares(rows, path, "Human majority and LLM judge (win / draw / lose of model A)", "% of items")


def write_report(report: Mapping[str, Any], out: str | os.PathLike) -> list[Path]:
    """`out` (JSON) and, beside it with the same stem, the markdown table and the bar plot."""
    out = as_path(out)
    written = [atomic_write_json(out, report), atomic_write_text(out.with_suffix(".md"), report_markdown(report))]
    if report["pairs"]:
        written.append(plot_report(report, out.with_suffix(".png")))
    return written
