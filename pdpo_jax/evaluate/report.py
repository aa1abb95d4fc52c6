"""Markdown tables and PNG plots for DNLI reports, judge results and training curves.

Plots are drawn on a bare `Figure` with the Agg canvas, so importing this module never changes
the caller's matplotlib backend. Every file is written atomically.

    python -m pdpo_jax.evaluate.report dnli A.json B.json --out DIR
    python -m pdpo_jax.evaluate.report judge judge_results.json --out DIR
    python -m pdpo_jax.evaluate.report curves sft=runs/x/sft/metrics.jsonl dpo=runs/x/dpo/metrics.jsonl --out DIR
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from pdpo_jax.metrics_log import read_metrics_jsonl
from pdpo_jax.storage import atomic_write_bytes, atomic_write_text

# DNLI: (key in the report, column title). Hits/Entail: higher is better; Rand/Contradict: lower.
DNLI_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("hits", "Hits@1", True),
    ("entail", "Entail@1", True),
    ("rand", "Rand@1", False),
    ("contradict", "Contradict@1", False),
)
OUTCOME_COLORS = {"win": "#4c9a2a", "draw": "#b0b0b0", "lose": "#c0392b"}


# --------------------------------------------------------------------------------------------
# Helpers


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align_right_from: int = 1) -> str:
    sep = ["---" if i < align_right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def save_figure(fig, path: str | os.PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------
# DNLI


def _dnli_rows(report: Mapping[str, Any]) -> list[tuple[str, int, dict[str, float], dict[str, int]]]:
    """(subset, n, percentages, counts) for every subset, then "overall"; validates the shape."""
    model = report.get("model", "?")
    if "subsets" not in report or not isinstance(report["subsets"], Mapping):
        raise ValueError(f"DNLI report of {model!r}: missing key 'subsets'")
    groups = list(report["subsets"].items())
    if "overall" in report:
        groups.append(("overall", report["overall"]))
    rows = []
    for name, entry in groups:
        where = f"DNLI report of {model!r}, subset {name!r}"
        counts = entry.get("counts")
        if not isinstance(counts, Mapping):
            raise ValueError(f"{where}: missing key 'counts'")
        missing = [k for k, _, _ in DNLI_METRICS if k not in counts]
        if missing:
            raise ValueError(f"{where}: counts lack {missing}")
        n = entry.get("n")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{where}: key 'n' must be a non-negative integer")
        # Derived from the counts rather than read, so a report storing fractions instead of
        # percentages cannot slip through as 100x too small.
        percentages = {k: 100.0 * counts[k] / n if n else float("nan") for k, _, _ in DNLI_METRICS}
        rows.append((name, n, percentages, {k: int(counts[k]) for k, _, _ in DNLI_METRICS}))
    return rows


def _dnli_header() -> list[str]:
    return [f"{title} (%) {'↑' if up else '↓'}" for _, title, up in DNLI_METRICS]


def dnli_markdown(report: Mapping[str, Any]) -> str:
    """One model's DNLI result: a row per subset (and overall), "percent (count)" per metric."""
    rows = [
        [name, str(n), *(f"{pct[k]:.1f} ({cnt[k]})" for k, _, _ in DNLI_METRICS)]
        for name, n, pct, cnt in _dnli_rows(report)
    ]
    title = f"### DNLI: {report.get('model', '?')} (protocol: {report.get('protocol', '?')})"
    return title + "\n\n" + _table(["subset", "n", *_dnli_header()], rows, align_right_from=1) + "\n"


def dnli_comparison_markdown(reports: Sequence[Mapping[str, Any]]) -> str:
    """Several models side by side: a row per (subset, model); the best value per subset in bold."""
    per_model = [(r.get("model", "?"), {name: (n, pct) for name, n, pct, _ in _dnli_rows(r)}) for r in reports]
    subsets: list[str] = []
    for _, groups in per_model:
        subsets += [s for s in groups if s not in subsets]
    rows = []
    for subset in subsets:
        present = [(model, groups[subset]) for model, groups in per_model if subset in groups]
        best = {}
        for key, _, up in DNLI_METRICS:
            values = [pct[key] for _, (_, pct) in present if not math.isnan(pct[key])]
            best[key] = (max if up else min)(values) if values and len(present) > 1 else None
        for model, (n, pct) in present:
            cells = []
            for key, _, _ in DNLI_METRICS:
                text = f"{pct[key]:.1f}"
                cells.append(f"**{text}**" if best[key] is not None and pct[key] == best[key] else text)
            rows.append([subset, model, str(n), *cells])
    protocols = sorted({str(r.get("protocol", "?")) for r in reports})
    title = f"### DNLI comparison (protocol: {', '.join(protocols)})"
    return title + "\n\n" + _table(["subset", "model", "n", *_dnli_header()], rows, align_right_from=2) + "\n"


def plot_dnli(
    reports: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    intervals: Sequence[Mapping[str, Mapping[str, Sequence[float]]]] | None = None,
) -> Path:
    """Grouped bars: a panel per subset (and overall), the four metrics on x, a bar per model.

    `intervals`, one per report, `{subset: {metric: (low, high)}}` in percent, draws error bars."""
    reports = [reports] if isinstance(reports, Mapping) else list(reports)
    if intervals is not None and len(intervals) != len(reports):
        raise ValueError(f"{len(intervals)} sets of intervals for {len(reports)} reports")
    per_model = [(r.get("model", "?"), {name: pct for name, _, pct, _ in _dnli_rows(r)}) for r in reports]
    subsets: list[str] = []
    for _, groups in per_model:
        subsets += [s for s in groups if s not in subsets]
    cols = min(3, len(subsets))
    nrows = math.ceil(len(subsets) / cols)
    fig = _figure(4.2 * cols, 3.4 * nrows + 0.4)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    width = 0.8 / len(per_model)
    colors = [f"C{i % 10}" for i in range(len(per_model))]
    for ax, subset in zip(axes, subsets):
        for m, (model, groups) in enumerate(per_model):
            if subset not in groups:
                continue
            values = [groups[subset][k] for k, _, _ in DNLI_METRICS]
            xs = [i - 0.4 + width * (m + 0.5) for i in range(len(DNLI_METRICS))]
            errors = None
            if intervals is not None:
                bounds = [intervals[m][subset][k] for k, _, _ in DNLI_METRICS]
                errors = [[v - lo for v, (lo, _) in zip(values, bounds)], [hi - v for v, (_, hi) in zip(values, bounds)]]
            bars = ax.bar(xs, values, width=width * 0.95, color=colors[m], label=model, yerr=errors,
                          capsize=2, error_kw={"elinewidth": 0.8})
            if len(per_model) <= 4 and errors is None:
                ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        ax.set_xticks(range(len(DNLI_METRICS)), [f"{t}\n{'↑' if up else '↓'}" for _, t, up in DNLI_METRICS], fontsize=8)
        ax.set_title(subset, fontsize=10)
        ax.set_ylabel("% of examples" + ("" if intervals is None else " (error bars: 95% interval)"), fontsize=8)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(subsets) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(4, len(per_model)), fontsize=8)
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Judge results (from pdpo_jax.evaluate.judge_pairs)


def _status_line(results: Mapping[str, Any]) -> str:
    status = results.get("status", {})
    parts = [
        f"judged {status.get('judged', '?')} of {status.get('requested', '?')}",
        f"unparsable {status.get('unparsable', 0)}",
        f"failed {status.get('failed', 0)}",
        f"re-asked orders {status.get('reasked_orders', 0)}",
    ]
    consistency = results.get("position_consistency") or {}
    if consistency.get("rate") is not None:
        parts.append(
            f"position consistency {100 * consistency['rate']:.1f}% ({consistency['consistent']}/{consistency['pairs']})"
        )
    if consistency.get("first_position_win_rate") is not None:
        parts.append(f"position 1 wins {100 * consistency['first_position_win_rate']:.1f}% of decided verdicts")
    judge = results.get("judge", {})
    if judge:
        parts.append(f"judge {judge.get('model')}, orders {results.get('orders', '?')}, language {results.get('language', '?')}")
    return "; ".join(parts) + "."


def _ci(low: float | None, high: float | None) -> str:
    return "n/a" if low is None or high is None else f"[{100 * low:.1f}, {100 * high:.1f}]"


def judge_markdown(results: Mapping[str, Any]) -> str:
    """Pairwise: the win/draw/lose row of model A vs B. Tournament: win rates and head-to-head."""
    convention = results.get("win_rate_convention", "").rstrip(".")
    convention = f"{convention}." if convention else ""
    if results.get("mode") == "pairwise":
        counts, pct = results["counts"], results["percentages"]
        rate = results["win_rate_a"]
        cells = [f"{_fmt(pct[k])} ({counts[k]})" for k in ("win", "draw", "lose")]
        table = _table(
            ["model A", "model B", "win (%)", "draw (%)", "lose (%)", "A win rate (%)", "95% CI"],
            [[results["model_a"], results["model_b"], *cells,
              _fmt(None if rate["value"] is None else 100 * rate["value"]), _ci(rate["ci_low"], rate["ci_high"])]],
            align_right_from=2,
        )
        return f"### Judge: {results['model_a']} vs {results['model_b']}\n\n{table}\n\n{_status_line(results)} {convention}\n"
    if results.get("mode") != "tournament":
        raise ValueError(f"judge results: unknown mode {results.get('mode')!r}")
    confidence = 100 * results.get("confidence", 0.95)
    ranked = sorted(results["models"], key=lambda r: -1 if r["win_rate"] is None else r["win_rate"], reverse=True)
    rows = [
        [r["model"], str(r["games"]), str(r["wins"]), str(r["draws"]), str(r["losses"]),
         _fmt(None if r["win_rate"] is None else 100 * r["win_rate"]), _ci(r["ci_low"], r["ci_high"])]
        for r in ranked
    ]
    table = _table(["model", "games", "wins", "draws", "losses", "win rate (%)", f"{confidence:.0f}% CI"], rows)
    models = [r["model"] for r in results["models"]]
    h2h = results["head_to_head"]
    matrix_rows = [
        [a, *("—" if a == b else "{win}/{draw}/{lose}".format(**h2h[a][b]) for b in models)] for a in models
    ]
    matrix = _table(["row vs column (win/draw/lose)", *models], matrix_rows)
    return (
        f"### Judge tournament\n\n{table}\n\n{_status_line(results)} {convention} "
        f"CIs: percentile bootstrap over games ({results.get('bootstrap_samples', '?')} resamples).\n\n"
        f"#### Head to head\n\n{matrix}\n"
    )


def _win_rate_rows(results: Mapping[str, Any]) -> list[tuple[str, float | None, float | None, float | None]]:
    if results.get("mode") == "pairwise":
        r = results["win_rate_a"]
        flip = lambda x: None if x is None else 1.0 - x  # noqa: E731
        return [
            (results["model_a"], r["value"], r["ci_low"], r["ci_high"]),
            (results["model_b"], flip(r["value"]), flip(r["ci_high"]), flip(r["ci_low"])),
        ]
    return [(r["model"], r["win_rate"], r["ci_low"], r["ci_high"]) for r in results["models"]]


def plot_win_rates(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Horizontal bars of win rate (%) with CI error bars, best model on top, 50% marked."""
    rows = sorted(_win_rate_rows(results), key=lambda r: -1 if r[1] is None else r[1])
    fig = _figure(6.4, 1.2 + 0.45 * len(rows))
    ax = fig.subplots()
    values = [0.0 if v is None else 100 * v for _, v, _, _ in rows]
    lower = [0.0 if v is None or lo is None else 100 * (v - lo) for _, v, lo, _ in rows]
    upper = [0.0 if v is None or hi is None else 100 * (hi - v) for _, v, _, hi in rows]
    ys = range(len(rows))
    ax.barh(ys, values, xerr=[lower, upper], color="C0", capsize=4, error_kw={"elinewidth": 1})
    for y, (_, v, lo, hi) in zip(ys, rows):
        label = "n/a" if v is None else f"{100 * v:.1f}" + ("" if lo is None else f" [{100 * lo:.1f}, {100 * hi:.1f}]")
        right = 0.0 if v is None else 100 * (v if hi is None else hi)
        ax.text(right + 1.5, y, label, va="center", ha="left", fontsize=8)
    ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=9)
    ax.axvline(50, color="gray", linestyle="--", linewidth=1)
    ax.set_xlim(0, 100)
    ax.set_xlabel("win rate (%) = (wins + 0.5 draws) / games, with 95% bootstrap CI", fontsize=8)
    ax.set_title("LLM-judge win rates", fontsize=10)
    return save_figure(fig, path)


def plot_outcomes(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Stacked win/draw/lose shares: one bar for A vs B, or one per model over all its games."""
    if results.get("mode") == "pairwise":
        c = results["counts"]
        rows = [(f"{results['model_a']}\nvs {results['model_b']}", c["win"], c["draw"], c["lose"])]
    else:
        rows = [(r["model"], r["wins"], r["draws"], r["losses"]) for r in results["models"]]
    return plot_outcome_shares(rows, path, "LLM-judge outcomes (win / draw / lose)", "% of judged games")


def plot_outcome_shares(rows: Sequence[tuple[str, int, int, int]], path: str | os.PathLike, title: str,
                        xlabel: str) -> Path:
    """One stacked bar of win/draw/lose shares per (label, wins, draws, losses) row, top to bottom."""
    fig = _figure(6.4, 1.4 + 0.5 * len(rows))
    ax = fig.subplots()
    left = [0.0] * len(rows)
    for column, outcome in enumerate(("win", "draw", "lose"), start=1):
        shares = [100 * r[column] / sum(r[1:]) if sum(r[1:]) else 0.0 for r in rows]
        bars = ax.barh(range(len(rows)), shares, left=left, color=OUTCOME_COLORS[outcome], label=outcome)
        ax.bar_label(bars, labels=[f"{s:.0f}%" if s >= 6 else "" for s in shares], label_type="center", fontsize=8)
        left = [a + b for a, b in zip(left, shares)]
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Training curves

NOT_METRICS = frozenset({"step", "split", "epoch", "time", "timestamp", "wall_time", "elapsed_s"})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names += [k for k, v in row.items() if k not in NOT_METRICS and k not in names and _is_number(v)]
    return names


# The PPO run's health at a glance: mean reward, KL to the starting model, clip fraction, value loss.
PPO_CURVE_METRICS = ("objective/scores", "objective/kl", "policy/clipfrac", "loss/value")


def plot_training_curves(
    runs: Mapping[str, str | os.PathLike | Sequence[Mapping[str, Any]]],
    path: str | os.PathLike,
    metrics: Sequence[str] | None = None,
) -> list[str]:
    """One PNG, a panel per metric; a colour per run, solid = train, dashed with markers = val.

    `runs` maps a label to a metrics.jsonl path or to already loaded rows. Returns the metrics drawn.
    """
    loaded = {
        label: read_metrics_jsonl(src) if isinstance(src, (str, os.PathLike)) else list(src) for label, src in runs.items()
    }
    names = list(metrics) if metrics else metric_names([row for rows in loaded.values() for row in rows])
    if not names:
        raise ValueError(f"no numeric metrics found in {list(runs.values())}")
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig = _figure(4.4 * cols, 3.0 * nrows + 0.4)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        for r, (label, rows) in enumerate(loaded.items()):
            splits = sorted({str(row["split"]) for row in rows})
            for split in splits:
                points = sorted((row["step"], row[name]) for row in rows if row["split"] == split and _is_number(row.get(name)))
                if not points:
                    continue
                style = {"linestyle": "-"} if split == "train" else {"linestyle": "--", "marker": "o", "markersize": 3}
                tag = split if len(loaded) == 1 else f"{label} {split}"
                ax.plot([p[0] for p in points], [p[1] for p in points], color=f"C{r % 10}", label=tag, linewidth=1.2, **style)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    save_figure(fig, path)
    return names


# --------------------------------------------------------------------------------------------
# Command line


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdpo_jax.evaluate.report", description="Tables and plots from result files.")
    sub = parser.add_subparsers(dest="kind", required=True)
    dnli = sub.add_parser("dnli", help="DNLI report JSONs -> dnli.md, dnli.png (several files are compared)")
    dnli.add_argument("reports", nargs="+")
    judge = sub.add_parser("judge", help="judge_results.json -> judge_results.md, win_rates.png, outcomes.png")
    judge.add_argument("results")
    curves = sub.add_parser("curves", help="LABEL=metrics.jsonl ... -> training_curves.png")
    curves.add_argument("runs", nargs="+", help="LABEL=PATH (or PATH, labelled by its folder)")
    curves.add_argument("--metrics", nargs="+", default=None, help="metric names to draw (default: all numeric)")
    for p in (dnli, judge, curves):
        p.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.kind == "dnli":
        reports = [_read_json(p) for p in args.reports]
        text = dnli_markdown(reports[0]) if len(reports) == 1 else dnli_comparison_markdown(reports)
        atomic_write_text(out / "dnli.md", text)
        plot_dnli(reports, out / "dnli.png")
    elif args.kind == "judge":
        results = _read_json(args.results)
        text = judge_markdown(results)
        atomic_write_text(out / "judge_results.md", text)
        plot_win_rates(results, out / "win_rates.png")
        plot_outcomes(results, out / "outcomes.png")
    else:
        runs = {}
        for spec in args.runs:
            label, _, src = spec.partition("=") if "=" in spec else (Path(spec).parent.name or spec, "", spec)
            runs[label] = src
        plot_training_curves(runs, out / "training_curves.png", args.metrics)
        text = f"wrote {out / 'training_curves.png'}"
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
