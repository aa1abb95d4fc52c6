"""A run's `summary/summary.md`: the DNLI table of every evaluated model (SFT, RL, PseudoDPO),
what the models say on the test turns (eval-responses), training figures, each round of iterative
DPO (`dpo.rounds` > 1), the LLM judge's results and what each stage chose, with `dnli.png`,
`curves.png` and `rl_curves.png` beside it. It reads only what the stages wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

from pdpo_jax.evaluate import report as plots
from pdpo_jax.evaluate.round_rows import round_rows, rounds_markdown
from pdpo_jax.storage import atomic_write_text
from pdpo_jax.evaluate.response_metrics import response_metrics_markdown
from pdpo_jax.run_layout import RESPONDING_MODELS, RunLayout

EVALUATED_MODELS = ("sft", "rl", "dpo")
TRAINING_CURVES = ("sft", "dpo")  # stages whose loss curves share one figure
STAGES_SHOWN = ("sft", "nli", "rl", "prefs", "dpo")  # whose DONE records the summary lists


def write_summary(layout: RunLayout) -> Path:
    """Writes the summary of the run at `layout` and returns the markdown file's path."""
    run, out_dir = layout.root, layout.summary
    reports = [json.loads(layout.dnli_report(m).read_text()) for m in EVALUATED_MODELS if layout.dnli_report(m).exists()]
    lines = [f"# Results of {run}", ""]
    if reports:
        plots.plot_dnli(reports, out_dir / "dnli.png")
        lines += ["## Dialogue NLI ranking", "", plots.dnli_comparison_markdown(reports), "", "![DNLI](dnli.png)", ""]
    said = [(name, json.loads(layout.response_metrics(m).read_text())) for m, name in RESPONDING_MODELS.items()
            if layout.response_metrics(m).exists()]
    if said:
        lines += ["## What the models say on the test turns", "", response_metrics_markdown(said),
                  "C-score (NLI classifier: +1 entailment, 0 neutral, -1 contradiction per persona sentence and "
                  "response, averaged, x 100), responses with a contradicted sentence, responses copying a persona "
                  "sentence (>= 80% of its word pairs): percent with 95% bootstrap intervals (`pdpo eval-responses`).", ""]
    curves = {m: layout.metrics(m) for m in TRAINING_CURVES if layout.metrics(m).exists()}
    rounds = round_rows(layout)
    curves |= {f"dpo round {r['round']}": Path(r["dpo"]) / "metrics.jsonl" for r in rounds[1:]
               if (Path(r["dpo"]) / "metrics.jsonl").exists()}
    rl_curves = layout.metrics("rl")
    if curves or rl_curves.exists():
        lines += ["## Training", ""]
    if curves:
        plots.plot_training_curves(curves, out_dir / "curves.png")
        lines += ["![training curves](curves.png)", ""]
    if rl_curves.exists():
        plots.plot_training_curves({"rl": rl_curves}, out_dir / "rl_curves.png", metrics=plots.PPO_CURVE_METRICS)
        lines += ["PPO (RL(DialogueNLI)): mean reward, KL to the SFT model, clip fraction, value loss.", "",
                  "![PPO curves](rl_curves.png)", ""]
    if len(rounds) > 1:
        lines += ["## Rounds of DPO", "",
                  "Round k samples its negatives with round k-1's best model and trains from it (docs/rounds.md).", "",
                  rounds_markdown(rounds)]
    if layout.judge_results.exists():
        lines += ["## LLM judge on the test turns", "", plots.judge_markdown(json.loads(layout.judge_results.read_text())), ""]
    lines += ["## Stages", ""]
    for stage in STAGES_SHOWN:
        done = layout.done(stage)
        if done.exists():
            info = json.loads(done.read_text())
            shown = {k: v for k, v in info.items() if not isinstance(v, (dict, list))}
            lines.append(f"- **{stage}**: " + ", ".join(f"{k} = {v}" for k, v in shown.items()))
    if layout.prefs_summary.exists():
        lines += ["", "Pseudo-preference summary:", "", "```json", layout.prefs_summary.read_text().strip(), "```"]
    lines += ["", f"Config: `{layout.config}`", ""]
    return atomic_write_text(layout.summary_markdown, "\n".join(lines))
