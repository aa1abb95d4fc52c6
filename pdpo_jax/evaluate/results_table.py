"""The results table of a reproduction run: several models' DNLI evaluations on the same examples.

    results = [read_dnli_result(name, path) for name, path in [("sft", "eval/sft/dnli.json"), ...]]
    table = results_table(results, reference="sft")
    write_results_table(table, results, "results/")

Each model is named by the report `eval-dnli` wrote (REPORT.json); its per-example records
(REPORT.examples.jsonl, beside it) carry the statistics: shares with bootstrap intervals and the
paired tests against the reference of `pdpo_jax.evaluate.dnli_stats`, and the log-likelihood shifts
of `pdpo_jax.evaluate.dnli_shifts`. Outputs, each written atomically: `table.json`, `table.md` (the
paper's Table 4 layout, then the paired tests and the score shifts), `dnli.png` (bars with the
intervals as error bars), `score_shifts.json`, and `curves.png` when training logs are given.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pdpo_jax.errors import PdpoError
from pdpo_jax.evaluate.dnli import output_paths
from pdpo_jax.evaluate.dnli_shifts import score_shifts, score_shifts_markdown
from pdpo_jax.evaluate.dnli_stats import (
    DEFAULT_SAMPLES, OVERALL, PAIRED_CATEGORIES, ModelPredictions, dnli_statistics, predictions_from_records,
)
from pdpo_jax.evaluate.report import DNLI_METRICS, PPO_CURVE_METRICS, _table, plot_dnli, plot_training_curves
from pdpo_jax.evaluate.response_metrics import REPORT_COLUMNS, metric_cell
from pdpo_jax.object_store import as_path, reported
from pdpo_jax.storage import atomic_write_json, atomic_write_text, jsonl_objects

INTERVALS_NOTE = ("{confidence:.0f}% percentile-bootstrap intervals over examples ({samples} resamples, seed {seed}); "
                  "a subset resamples within itself, overall within each subset (stratified: subset sizes fixed).")
TEST_NOTE = ("p: exact two-sided McNemar test against {reference} on the same examples, on the examples where "
             "exactly one of the two models puts that category first; differences (model - {reference}, in "
             "percentage points) have paired bootstrap intervals.")

__all__ = ["DnliResult", "ResultsError", "read_dnli_result", "read_response_report", "responses_markdown",
           "results_table", "results_markdown", "write_results_table"]


class ResultsError(PdpoError):
    """A report or per-example file that cannot go into the table; the message names the file."""


@dataclass(frozen=True)
class DnliResult:
    """One model's DNLI report and its per-example records, as read from disk."""

    name: str
    report_path: Path
    examples_path: Path
    report: dict[str, Any]
    records: list[dict[str, Any]]
    predictions: ModelPredictions


def read_dnli_result(name: str, report_path: str | os.PathLike) -> DnliResult:
    """The report and, beside it, its examples sidecar (the name the report's `files.examples` gives,
    else the REPORT.examples.jsonl convention; gzipped as `<sidecar>.gz` where only that is at hand,
    as the committed results keep it); the sidecar's tallies must equal the report's."""
    path = as_path(report_path)
    with reported(path):
        there = path.is_file()
    if not there:
        raise ResultsError(f"{path}: DNLI report not found (model {name!r})")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path}: not valid JSON ({err.msg})") from None
    if not isinstance(report, dict) or not isinstance(report.get("subsets"), dict):
        raise ResultsError(f"{path}: not a DNLI report (no 'subsets')")
    sidecar = (report.get("files") or {}).get("examples")
    examples_path = path.parent / sidecar if isinstance(sidecar, str) else output_paths(path)["examples"]
    gzipped = examples_path.with_name(examples_path.name + ".gz")
    if not examples_path.is_file() and gzipped.is_file():
        examples_path = gzipped
    if not examples_path.is_file():
        raise ResultsError(f"{examples_path}: the per-example records of {path} are missing (eval-dnli writes them beside the report)")
    records = [record for _, record in jsonl_objects(examples_path, ResultsError, gzipped=examples_path == gzipped)]
    predictions = predictions_from_records(name, records, str(examples_path))
    if set(predictions.subsets) != set(report["subsets"]):
        raise ResultsError(f"{examples_path} does not match {path}: subsets {sorted(set(predictions.subsets))} in the "
                           f"records, {sorted(report['subsets'])} in the report")
    for subset, entry in report["subsets"].items():
        counted = {c: sum(1 for s, p in zip(predictions.subsets, predictions.predicted) if s == subset and p == c)
                   for c, _, _ in DNLI_METRICS}
        if {c: (entry.get("counts") or {}).get(c) for c in counted} != counted:
            raise ResultsError(f"{examples_path} does not match {path}: subset {subset!r} counts {counted} in the records, "
                               f"{entry.get('counts')} in the report (a sidecar of another run?)")
    return DnliResult(name, path, examples_path, report, records, predictions)


def _same_protocol(results: Sequence[DnliResult]) -> None:
    protocols = {str(r.report.get("protocol")) for r in results}
    if len(protocols) > 1:
        listed = ", ".join(f"{r.report_path}: {r.report.get('protocol')}" for r in results)
        raise ResultsError(f"the reports use different candidate protocols ({listed}); compare runs of one protocol")


def results_table(results: Sequence[DnliResult], reference: str, *, samples: int = DEFAULT_SAMPLES, seed: int = 0,
                  confidence: float = 0.95, also_against: Sequence[str] = ()) -> dict[str, Any]:
    """table.json: a row per model in the order given, a group per subset plus `overall`; each
    model of `also_against` adds the same paired tests against it under `paired_against`."""
    if not results:
        raise ResultsError("no models given")
    _same_protocol(results)
    stats = dnli_statistics([r.predictions for r in results], reference, samples=samples, seed=seed,
                            confidence=confidence)
    rows = []
    for result, row in zip(results, stats["models"]):
        groups = {}
        for group, entry in row["groups"].items():
            groups[group] = {
                "n": entry["n"],
                "counts": {k: entry["counts"][k] for k, _, _ in DNLI_METRICS},
                "percentages": {k: entry["percentages"][k] for k, _, _ in DNLI_METRICS},
                "intervals": {k: list(entry["intervals"][k]) for k, _, _ in DNLI_METRICS},
                "paired": {c: None if test is None else {**test, "interval": list(test["interval"])}
                           for c, test in entry["paired"].items()},
            }
        rows.append({"model": result.name, "report": str(result.report_path), "examples": str(result.examples_path),
                     "protocol": result.report.get("protocol"), "scoring": result.report.get("scoring"),
                     "groups": groups})
    table = {
        "reference": reference,
        "subsets": stats["subsets"],
        "groups": [*stats["subsets"], OVERALL],
        "confidence": confidence,
        "bootstrap_samples": samples,
        "seed": seed,
        "intervals": INTERVALS_NOTE.format(confidence=100 * confidence, samples=samples, seed=seed),
        "test": TEST_NOTE.format(reference=reference),
        "rows": rows,
    }
    if also_against:
        table["paired_against"] = {other: _paired_tests(results, other, samples=samples, seed=seed,
                                                        confidence=confidence) for other in also_against}
    return table


def _paired_tests(results: Sequence[DnliResult], reference: str, *, samples: int, seed: int, confidence: float
                  ) -> dict[str, Any]:
    """Every other model's paired tests against `reference`: {"test": note, "models": {model: {group: tests}}}."""
    stats = dnli_statistics([r.predictions for r in results], reference, samples=samples, seed=seed,
                            confidence=confidence)
    models = {result.name: {group: {c: None if test is None else {**test, "interval": list(test["interval"])}
                                    for c, test in entry["paired"].items()}
                            for group, entry in row["groups"].items()}
              for result, row in zip(results, stats["models"]) if result.name != reference}
    return {"test": TEST_NOTE.format(reference=reference), "models": models}


def table_score_shifts(results: Sequence[DnliResult], reference: str) -> dict[str, Any]:
    """score_shifts.json: every other model's log-likelihood changes against the reference."""
    base = next(r for r in results if r.name == reference)
    return {
        "reference": reference,
        "models": {r.name: score_shifts(base.records, r.records, before_source=str(base.examples_path),
                                        after_source=str(r.examples_path))
                   for r in results if r.name != reference},
    }


# --------------------------------------------------------------------------------------------
# Markdown


def _p(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _share(entry: Mapping[str, Any], key: str) -> str:
    low, high = entry["intervals"][key]
    return f"{entry['percentages'][key]:.1f} [{low:.1f}, {high:.1f}]"


def _paired_cell(test: Mapping[str, Any] | None) -> list[str]:
    if test is None:
        return ["—", "—", "—"]
    low, high = test["interval"]
    return [f"{test['difference']:+.1f} [{low:+.1f}, {high:+.1f}]", f"{test['model_only']} / {test['reference_only']}",
            _p(test["p_value"])]


def read_response_report(name: str, path: str | os.PathLike) -> dict[str, Any]:
    """A model's `pdpo eval-responses` report (C-score, contradiction and persona-copy rates, ...)."""
    path = as_path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{path}: eval-responses report not found (model {name!r})") from None
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path}: not valid JSON ({err.msg})") from None
    if not isinstance(report, dict) or not isinstance(report.get("c_score"), dict):
        raise ResultsError(f"{path}: not an eval-responses report (no 'c_score')")
    return report


def responses_markdown(table: Mapping[str, Any] | None, reports: Mapping[str, Mapping[str, Any]]) -> str:
    """What each model says (`pdpo eval-responses`) beside how it ranks DNLI candidates: a row per
    model, the overall Hits@1 and Contradict@1 of `table` (when it has the model) next to the
    C-score, contradiction and persona-copy rates, distinct-n and length of its responses."""
    dnli_rows = {row["model"]: row["groups"][OVERALL] for row in (table or {}).get("rows", [])}
    dnli_columns = [("hits", "DNLI Hits@1 ↑"), ("contradict", "DNLI Contradict@1 ↓")] if dnli_rows else []
    arrows = {True: " ↑", False: " ↓", None: ""}
    header = ["model", *(title for _, title in dnli_columns), "responses",
              *(f"{title}{arrows[up]}" for _, title, up in REPORT_COLUMNS)]
    rows = []
    for name, report in reports.items():
        dnli = dnli_rows.get(name)
        rows.append([name, *(_share(dnli, key) if dnli else "—" for key, _ in dnli_columns), str(report["responses"]),
                     *(metric_cell(report, key) for key, _, _ in REPORT_COLUMNS)])
    note = ("C-score: per persona sentence and response, the NLI classifier's +1 entailment / 0 neutral / -1 "
            "contradiction, averaged over the sentences, then over responses, x 100; contradiction: responses "
            "with a sentence judged contradicted; persona copy: responses holding >= 80% of a persona sentence's "
            "word pairs; all in percent with 95% bootstrap intervals over responses (docs/evaluation.md).")
    return "\n".join(["### What the models say", "", _table(header, rows), "", note, ""])


def _paired_section(reference: str, paired: Mapping[str, Mapping[str, Any]], groups: Sequence[str], note: str
                    ) -> list[str]:
    """"Paired against REFERENCE": a line per model and group, from {model: {group: tests}}."""
    titles = dict((k, t) for k, t, _ in DNLI_METRICS)
    header = ["model", "subset"]
    for c in PAIRED_CATEGORIES:
        header += [f"Δ {titles[c]} (pp) [95% CI]", f"{titles[c]}: model only / {reference} only", f"p ({titles[c]})"]
    rows = [[model, g, *(cell for c in PAIRED_CATEGORIES for cell in _paired_cell(tests[g][c]))]
            for model, tests in paired.items() for g in groups]
    if not rows:
        return []
    return [f"#### Paired against {reference}", "", _table(header, rows, align_right_from=2), "", note, ""]


def results_markdown(table: Mapping[str, Any], shifts: Mapping[str, Any] | None = None) -> str:
    """Table 4 (a row per model, the four shares per subset and overall, p-values of the overall
    Hits@1 and Contradict@1 against the reference), then every paired test (against the reference,
    then against each model of `paired_against`), then the score shifts."""
    reference = table["reference"]
    groups = table["groups"]
    sizes = ", ".join(f"{g} {table['rows'][0]['groups'][g]['n']}" for g in groups)
    arrows = {k: "↑" if up else "↓" for k, _, up in DNLI_METRICS}
    header = ["model", *(f"{g} {title} {arrows[k]}" for g in groups for k, title, _ in DNLI_METRICS),
              f"p vs {reference} (overall Hits@1 / Contradict@1)"]
    rows = []
    for row in table["rows"]:
        overall = row["groups"][OVERALL]["paired"]
        p_cell = "—" if row["model"] == reference else " / ".join(_p(overall[c]["p_value"]) for c in PAIRED_CATEGORIES)
        rows.append([row["model"], *(_share(row["groups"][g], k) for g in groups for k, _, _ in DNLI_METRICS), p_cell])
    protocols = sorted({str(r.get("protocol")) for r in table["rows"]})
    parts = [f"### DNLI (n: {sizes}; protocol {', '.join(protocols)})", "", _table(header, rows), "",
             f"Percent of examples whose top-ranked candidate is of each category, with {table['intervals']}", ""]
    parts += _paired_section(reference, {row["model"]: {g: row["groups"][g]["paired"] for g in groups}
                                         for row in table["rows"] if row["model"] != reference}, groups, table["test"])
    for other, tests in table.get("paired_against", {}).items():
        parts += _paired_section(other, tests["models"], groups, tests["test"])
    if shifts and shifts["models"]:
        parts += [f"#### Log-likelihood changes against {reference}", ""]
        for model, result in shifts["models"].items():
            parts += [f"{model}:", "", score_shifts_markdown(result, reference, model)]
    return "\n".join(parts).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------
# Files


def _report_shaped(row: Mapping[str, Any], subsets: Sequence[str]) -> dict[str, Any]:
    def entry(group: str) -> dict[str, Any]:
        return {"n": row["groups"][group]["n"], "counts": row["groups"][group]["counts"]}

    return {"model": row["model"], "subsets": {s: entry(s) for s in subsets}, "overall": entry(OVERALL)}


def write_results_table(table: Mapping[str, Any], results: Sequence[DnliResult], out_dir: str | os.PathLike,
                        curves: Mapping[str, str | os.PathLike] | None = None,
                        ppo_curves: Mapping[str, str | os.PathLike] | None = None,
                        responses: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Path]:
    """table.json, table.md, dnli.png, score_shifts.json, and from label -> metrics.jsonl maps
    curves.png (`curves`: every metric of the SFT/DPO runs) and ppo_curves.png (`ppo_curves`: the
    PPO runs' reward, KL, clip fraction and value loss). `responses` (name -> eval-responses
    report) adds "What the models say" to table.md and a "responses" entry to table.json."""
    out = as_path(out_dir)
    shifts = table_score_shifts(results, table["reference"])
    paths = {"json": out / "table.json", "markdown": out / "table.md", "plot": out / "dnli.png",
             "score_shifts": out / "score_shifts.json"}
    for name, logs, metrics in (("curves", curves, None), ("ppo_curves", ppo_curves, PPO_CURVE_METRICS)):
        if not logs:
            continue
        for label, source in logs.items():
            if not as_path(source).is_file():
                raise ResultsError(f"{source}: training log of {label!r} not found")
        paths[name] = out / f"{name}.png"
        plot_training_curves(logs, paths[name], metrics=metrics)
    plot_dnli([_report_shaped(row, table["subsets"]) for row in table["rows"]], paths["plot"],
              intervals=[{g: row["groups"][g]["intervals"] for g in table["groups"]} for row in table["rows"]])
    atomic_write_json(paths["score_shifts"], shifts)
    markdown = results_markdown(table, shifts)
    if responses:
        markdown += "\n" + responses_markdown(table, responses)
        table = {**table, "responses": dict(responses)}
    atomic_write_text(paths["markdown"], markdown)
    atomic_write_json(paths["json"], table)
    return paths
