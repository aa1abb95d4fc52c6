"""A row per round of iterative DPO (`dpo.rounds`), read from what each round's stages wrote: the
pairs it kept, the model that sampled its negatives (path and digest), where its training ended
and, where that round's model was ranked, its overall DNLI shares.

    rows = round_rows(RunLayout(run_dir))      # [] for a run without a DPO folder
    rounds_markdown(rows)                      # the table `pdpo results --rounds` and the summary show

Round 1 is `prefs/` and `dpo/`; round k >= 2 is `round-k/prefs` and `round-k/dpo`; a round's DNLI
report is `eval/dpo/dnli.json` for the last round on disk and `eval/dpo-round-k/dnli.json` before it
(`RunLayout.round_dnli_report`). A file a round has not written yet leaves its cells empty.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pdpo_jax.errors import PdpoError
from pdpo_jax.evaluate.report import DNLI_METRICS, _table
from pdpo_jax.metrics_log import read_metrics_jsonl
from pdpo_jax.run_layout import RunLayout
from pdpo_jax.storage import DONE_MARKER

# metrics.jsonl keys of the training curve's end: (split, key, column title)
CURVE_END = (("train", "loss", "last train loss"), ("val", "loss", "last val loss"),
             ("val", "rewards/accuracies", "last val reward acc."))


class RoundsError(PdpoError):
    """A file of a round that cannot be read; the message names it."""


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError as err:
        raise RoundsError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None


def _metrics(path: Path) -> list[dict[str, Any]]:
    try:
        return read_metrics_jsonl(path) if path.is_file() else []
    except ValueError as err:  # a line that is not JSON or has no step; the message names the line
        raise RoundsError(str(err)) from None


def _last(rows: list[dict[str, Any]], split: str, key: str) -> float | None:
    values = [row[key] for row in rows if row.get("split") == split and isinstance(row.get(key), (int, float))]
    return values[-1] if values else None


def round_rows(layout: RunLayout) -> list[dict[str, Any]]:
    """Every round on disk, in order (see the module's docstring for what each row holds)."""
    rounds = layout.rounds_on_disk()
    rows = []
    for number in rounds:
        folder = layout.round_folder(number)
        prefs, dpo = folder / "prefs", folder / "dpo"
        summary = _json(prefs / "summary.json") or {}
        done = _json(dpo / DONE_MARKER)
        metrics = _metrics(dpo / "metrics.jsonl")
        report = _json(layout.round_dnli_report(number, rounds[-1]))
        overall = (report or {}).get("overall") or {}
        rows.append({
            "round": number,
            "prefs": str(prefs),
            "pairs_kept": {split: counts.get("kept") for split, counts in (summary.get("splits") or {}).items()},
            "generator": summary.get("generator"),
            "reference": summary.get("reference"),
            "dpo": str(dpo),
            "finished": done is not None,
            "best_step": (done or {}).get("best_step"),
            "best_value": (done or {}).get("best_value"),
            "last_step": max((row["step"] for row in metrics), default=None),
            "curve_end": {f"{split}/{key}": _last(metrics, split, key) for split, key, _ in CURVE_END},
            "dnli": ({key: 100.0 * overall["counts"][key] / overall["n"] for key, _, _ in DNLI_METRICS}
                     if overall.get("n") else None),
        })
    return rows


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def rounds_markdown(rows: list[dict[str, Any]]) -> str:
    """The rounds as a markdown table, then which model sampled each round's negatives."""
    header = ["round", "pairs kept (train / val)", "best val reward acc. (step)", "last step",
              *(title for _, _, title in CURVE_END), *(f"DNLI {title} (%)" for _, title, _ in DNLI_METRICS)]
    table = []
    for row in rows:
        kept = row["pairs_kept"]
        best = ("—" if row["best_value"] is None else f"{row['best_value']:.4f} ({row['best_step']})")
        dnli = row["dnli"] or {}
        table.append([str(row["round"]), f"{kept.get('train', '—')} / {kept.get('val', '—')}", best,
                      "—" if row["last_step"] is None else str(row["last_step"]),
                      *(_number(row["curve_end"][f"{split}/{key}"]) for split, key, _ in CURVE_END),
                      *(_number(dnli.get(key), 1) if dnli else "—" for key, _, _ in DNLI_METRICS)])
    lines = [_table(header, table), ""]
    for row in rows:
        generator = row["generator"] or {}
        lines.append(f"- round {row['round']}: negatives sampled by `{generator.get('path', '—')}` "
                     f"({generator.get('digest', '—')}), reference `{(row['reference'] or {}).get('path', '—')}`")
    return "\n".join(lines) + "\n"
