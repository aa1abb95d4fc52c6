"""Markdown tables and PNG plots for DNLI reports, judge results and training curves."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from pdpo_jax.evaluate import judge_pairs, judge_stats, report
from pdpo_jax.metrics_log import read_metrics_jsonl


def dnli_report(model: str, counts_by_subset: dict[str, dict[str, int]], n_by_subset: dict[str, int], with_pct: bool = True):
    subsets = {}
    for name, counts in counts_by_subset.items():
        n = n_by_subset[name]
        entry = {"counts": counts, "n": n}
        if with_pct:
            entry["percentages"] = {k: 100.0 * v / n for k, v in counts.items()}
        subsets[name] = entry
    total = {k: sum(c[k] for c in counts_by_subset.values()) for k in ("hits", "entail", "rand", "contradict")}
    n_all = sum(n_by_subset.values())
    return {
        "model": model,
        "protocol": "31 candidates",
        "subsets": subsets,
        "overall": {"counts": total, "percentages": {k: 100.0 * v / n_all for k, v in total.items()}, "n": n_all},
    }


SFT = dnli_report(
    "sft",
    {"attributes": {"hits": 12, "entail": 5, "rand": 2, "contradict": 7}, "likes": {"hits": 3, "entail": 9, "rand": 0, "contradict": 4}},
    {"attributes": 40, "likes": 16},
)
PDPO = dnli_report(
    "pdpo",
    {"attributes": {"hits": 20, "entail": 8, "rand": 1, "contradict": 2}, "likes": {"hits": 2, "entail": 10, "rand": 1, "contradict": 1}},
    {"attributes": 40, "likes": 16},
    with_pct=False,  # percentages derived from counts / n
)


def assert_png(path, min_size=(200, 100)):
    assert path.exists()
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 10  # something was drawn


def no_temp_files(folder):
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_dnli_markdown_shows_percentages_and_counts():
    md = report.dnli_markdown(SFT)
    assert "| attributes | 40 | 30.0 (12) | 12.5 (5) | 5.0 (2) | 17.5 (7) |" in md
    assert "| likes | 16 | 18.8 (3) | 56.2 (9) | 0.0 (0) | 25.0 (4) |" in md
    assert "| overall | 56 | 26.8 (15) | 25.0 (14) | 3.6 (2) | 19.6 (11) |" in md
    assert "sft" in md and "31 candidates" in md


def test_dnli_comparison_bolds_the_best_in_the_right_direction():
    md = report.dnli_comparison_markdown([SFT, PDPO])
    # Higher is better for Hits/Entail, lower for Rand/Contradict.
    assert "| attributes | sft | 40 | 30.0 | 12.5 | 5.0 | 17.5 |" in md
    assert "| attributes | pdpo | 40 | **50.0** | **20.0** | **2.5** | **5.0** |" in md
    assert "| likes | sft | 16 | **18.8** | 56.2 | **0.0** | 25.0 |" in md
    assert "| likes | pdpo | 16 | 12.5 | **62.5** | 6.2 | **6.2** |" in md


def test_dnli_report_errors_name_the_subset():
    broken = json.loads(json.dumps(SFT))
    del broken["subsets"]["likes"]["counts"]["contradict"]
    with pytest.raises(ValueError, match=r"subset 'likes': counts lack \['contradict'\]"):
        report.dnli_markdown(broken)


def test_dnli_plot_is_a_png(tmp_path):
    report.plot_dnli([SFT, PDPO], tmp_path / "cmp.png")
    report.plot_dnli(SFT, tmp_path / "one.png")
    assert_png(tmp_path / "cmp.png")
    assert_png(tmp_path / "one.png")
    assert no_temp_files(tmp_path)


def pair_judgment(example: str, a: str, b: str, outcomes: tuple[str, ...]) -> judge_pairs.PairJudgment:
    item = judge_pairs.PairItem(example, ("p",), ("h",), a, "ra", b, "rb")
    to_verdict = {"win": 1, "lose": 2, "draw": 3}
    orders = []
    for k, outcome in enumerate(outcomes):
        a_first = k == 0
        v = to_verdict[outcome] if a_first or outcome == "draw" else 3 - to_verdict[outcome]
        orders.append(judge_pairs.OrderJudgment(a_first=a_first, status="ok", verdict=v, outcome=outcome, texts=(f"[[{v}]]",)))
    return judge_pairs.PairJudgment(item, tuple(orders))


def test_judge_pairwise_markdown_and_plots(tmp_path):
    plan = [("win", "win")] * 5 + [("win", "draw")] * 2 + [("draw", "draw")] * 2 + [("lose", "lose")] * 3 + [("win", "lose")]
    judgments = [pair_judgment(str(i), "pdpo", "sft", o) for i, o in enumerate(plan)]
    results = judge_stats.pairwise_summary(judgments, "pdpo", "sft", bootstrap=300, seed=0)
    assert results["counts"] == {"win": 7, "draw": 3, "lose": 3}
    md = report.judge_markdown(results)
    rate = (7 + 0.5 * 3) / 13
    assert f"| pdpo | sft | {100 * 7 / 13:.1f} (7) | {100 * 3 / 13:.1f} (3) | {100 * 3 / 13:.1f} (3) | {100 * rate:.1f} |" in md
    assert "position consistency 76.9% (10/13)" in md
    report.plot_win_rates(results, tmp_path / "wr.png")
    report.plot_outcomes(results, tmp_path / "out.png")
    assert_png(tmp_path / "wr.png")
    assert_png(tmp_path / "out.png")


def test_judge_tournament_markdown_and_plots(tmp_path):
    games = [("a", "b", "win"), ("a", "c", "win"), ("b", "c", "draw"), ("c", "a", "lose"), ("b", "a", "win"), ("c", "b", "lose")]
    judgments = [pair_judgment(str(i), x, y, (o, o)) for i, (x, y, o) in enumerate(games)]
    results = judge_stats.tournament_summary(judgments, ["a", "b", "c"], bootstrap=300, seed=0)
    rows = {r["model"]: r for r in results["models"]}
    # a: W W W(c lost to a) L(b beat a) -> 3 wins 1 loss; b: L D W W; c: L D L L
    assert (rows["a"]["wins"], rows["a"]["draws"], rows["a"]["losses"]) == (3, 0, 1)
    assert (rows["b"]["wins"], rows["b"]["draws"], rows["b"]["losses"]) == (2, 1, 1)
    assert (rows["c"]["wins"], rows["c"]["draws"], rows["c"]["losses"]) == (0, 1, 3)
    md = report.judge_markdown(results)
    assert "| a | 4 | 3 | 0 | 1 | 75.0 |" in md
    assert "| b | 4 | 2 | 1 | 1 | 62.5 |" in md
    assert "| c | 4 | 0 | 1 | 3 | 12.5 |" in md
    assert "| a | — | 1/0/1 | 2/0/0 |" in md  # a vs b: one win, one loss; a vs c: two wins
    for row in results["models"]:
        assert row["ci_low"] <= row["win_rate"] <= row["ci_high"]
    report.plot_win_rates(results, tmp_path / "wr.png")
    report.plot_outcomes(results, tmp_path / "out.png")
    assert_png(tmp_path / "wr.png")
    assert_png(tmp_path / "out.png")
    json.dumps(results, allow_nan=False)  # results are plain JSON


def write_metrics(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_training_curves_panel_per_metric(tmp_path):
    rows = []
    for step in range(0, 50, 5):
        rows.append({"step": step, "split": "train", "loss": math.exp(-step / 20), "rewards/accuracies": step / 50, "lr": 1e-4})
        if step % 10 == 0:
            rows.append({"step": step, "split": "val", "loss": math.exp(-step / 25), "rewards/accuracies": step / 60})
    path = write_metrics(tmp_path / "metrics.jsonl", rows)
    assert read_metrics_jsonl(path) == rows
    drawn = report.plot_training_curves({"dpo": path}, tmp_path / "curves.png")
    assert drawn == ["loss", "rewards/accuracies", "lr"]
    assert_png(tmp_path / "curves.png")
    picked = report.plot_training_curves({"a": path, "b": rows[::2]}, tmp_path / "two.png", metrics=["loss"])
    assert picked == ["loss"]
    assert_png(tmp_path / "two.png")
    with Image.open(tmp_path / "curves.png") as wide, Image.open(tmp_path / "two.png") as narrow:
        assert wide.size[0] > narrow.size[0]  # three panels side by side vs one
    assert no_temp_files(tmp_path)


def test_training_curves_bad_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"split": "train", "loss": 0.5}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: missing numeric key 'step'"):
        read_metrics_jsonl(path)


def test_report_command_line(tmp_path):
    (tmp_path / "sft.json").write_text(json.dumps(SFT))
    (tmp_path / "pdpo.json").write_text(json.dumps(PDPO))
    assert report.main(["dnli", str(tmp_path / "sft.json"), str(tmp_path / "pdpo.json"), "--out", str(tmp_path / "d")]) == 0
    assert "**50.0**" in (tmp_path / "d" / "dnli.md").read_text()
    assert_png(tmp_path / "d" / "dnli.png")
    metrics = write_metrics(tmp_path / "m.jsonl", [{"step": s, "split": "train", "loss": 1.0 / (s + 1)} for s in range(5)])
    assert report.main(["curves", f"sft={metrics}", "--out", str(tmp_path / "c")]) == 0
    assert_png(tmp_path / "c" / "training_curves.png")


def test_bootstrap_rates_from_summary_match_direct_resampling():
    # Independent reference: resample game indices directly and recompute the win rate. The
    # tolerance allows for Monte Carlo noise of two independent 4000-sample bootstraps (the rate
    # moves in steps of 1/28 here).
    outcomes = ["win"] * 6 + ["draw"] * 3 + ["lose"] * 5
    judgments = [pair_judgment(str(i), "x", "y", (o, o)) for i, o in enumerate(outcomes)]
    results = judge_stats.pairwise_summary(judgments, "x", "y", bootstrap=4000, seed=3)
    scores = np.array([{"win": 1.0, "draw": 0.5, "lose": 0.0}[o] for o in outcomes])
    rng = np.random.default_rng(123)
    rates = scores[rng.integers(0, len(scores), size=(4000, len(scores)))].mean(axis=1)
    low, high = np.percentile(rates, [2.5, 97.5])
    assert results["win_rate_a"]["ci_low"] == pytest.approx(low, abs=0.05)
    assert results["win_rate_a"]["ci_high"] == pytest.approx(high, abs=0.05)
