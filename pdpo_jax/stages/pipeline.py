"""`pdpo pipeline`: SFT -> make-prefs -> DPO -> DNLI evaluation of both models -> both models'
responses to the test turns -> the LLM judge on them (when the config names a judge model) ->
export-hf -> results summary, inside one run directory.

Each stage writes its own folder and a `DONE` marker last; a rerun skips finished stages and
resumes the unfinished one where it stopped. `--stages` (or `pipeline.stages` in the config) runs
another list, always in pipeline order: e.g. only the evaluation, or the RL(DialogueNLI) baseline
`sft, train-nli, rl, eval-sft, eval-rl, summary` (configs/paper/variants/rl-dnli.yaml).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from pdpo_jax.config import ConfigError, RunConfig
from pdpo_jax.errors import UsageError
from pdpo_jax.evaluate import report as plots
from pdpo_jax.evaluate.dnli import DnliSettings, evaluate_dnli, write_outputs
from pdpo_jax.storage import atomic_write_json, atomic_write_text, mark_done
from pdpo_jax.model.export import export_hf
from pdpo_jax.parallel import barrier, is_primary, primary_decides
from pdpo_jax.stages.common import (
    build_mesh,
    claim_run_dir,
    config_from_args,
    finished,
    load_for_run,
    stage_parser,
    write_resolved_config,
)
from pdpo_jax.stages.dpo import run_dpo
from pdpo_jax.stages.judge import JUDGE_DIR, judge_test_responses
from pdpo_jax.stages.make_prefs import make_prefs
from pdpo_jax.stages.rl import run_rl
from pdpo_jax.stages.sft import run_sft
from pdpo_jax.stages.test_responses import write_test_responses
from pdpo_jax.stages.train_nli import run_train_nli

EVALUATED_MODELS = ("sft", "rl", "dpo")
TRAINING_CURVES = ("sft", "dpo")  # stages whose loss curves share one figure


def model_label(config: RunConfig, which: str) -> str:
    """The name a stage's model has in the reports: SFT, RL (the RL(DialogueNLI) baseline), DPO, or
    RL+DPO when the pseudo-preferences came from the RL model."""
    if which == "dpo" and config.prefs.from_stage == "rl":
        return "RL+DPO"
    return which.upper()


def run_eval(config: RunConfig, which: str) -> dict[str, Any]:
    """DNLI ranking of the stage `which`'s best model, on the run's mesh (every host scores its
    rows of each batch; process 0 writes the report)."""
    out_dir = Path(config.run_dir) / "eval" / which
    mesh = build_mesh(config)
    if finished(out_dir):
        return primary_decides(lambda: json.loads((out_dir / "dnli.json").read_text()))
    if not config.eval.dnli:
        raise ConfigError("eval.dnli is empty: name the DNLI evaluation files to rank candidates on")
    model = load_for_run(Path(config.run_dir) / which / "best", config, mesh=mesh)
    settings = DnliSettings(protocol=config.eval.protocol, scoring="mean" if config.eval.length_normalized else "sum",
                            template=config.data.template, max_examples=config.eval.max_examples)
    report, records = evaluate_dnli(model, config.eval.dnli, settings, mesh=mesh, model_name=model_label(config, which),
                                    show_progress=is_primary())
    if is_primary():
        write_outputs(report, records, out_dir / "dnli.json")
        mark_done(out_dir, {"model": which})
    barrier(f"eval-{which}")
    return report


def run_export(config: RunConfig) -> dict[str, Any]:
    """The DPO model as a Hugging Face directory: loaded onto the run's mesh, gathered onto
    process 0 one tensor at a time, written by it alone."""
    out_dir = Path(config.run_dir) / "export"
    if not finished(out_dir):
        export_hf(Path(config.run_dir) / "dpo" / "best", out_dir / "hf", mesh=build_mesh(config))
        if is_primary():
            mark_done(out_dir, {"hf_dir": str(out_dir / "hf")})
        barrier("export-hf")
    return {"hf_dir": str(out_dir / "hf")}


def write_summary(config: RunConfig) -> Path:
    """`summary.md` with the DNLI table of every evaluated model (SFT, RL, PseudoDPO), training
    figures and what each stage chose, plus `dnli.png`, `curves.png` and `rl_curves.png` beside it."""
    run = Path(config.run_dir)
    out_dir = run / "summary"
    reports = [json.loads((run / "eval" / m / "dnli.json").read_text()) for m in EVALUATED_MODELS
               if (run / "eval" / m / "dnli.json").exists()]
    lines = [f"# Results of {run}", ""]
    if reports:
        plots.plot_dnli(reports, out_dir / "dnli.png")
        lines += ["## Dialogue NLI ranking", "", plots.dnli_comparison_markdown(reports), "", "![DNLI](dnli.png)", ""]
    curves = {m: run / m / "metrics.jsonl" for m in TRAINING_CURVES if (run / m / "metrics.jsonl").exists()}
    if curves or (run / "rl" / "metrics.jsonl").exists():
        lines += ["## Training", ""]
    if curves:
        plots.plot_training_curves(curves, out_dir / "curves.png")
        lines += ["![training curves](curves.png)", ""]
    if (run / "rl" / "metrics.jsonl").exists():
        plots.plot_training_curves({"rl": run / "rl" / "metrics.jsonl"}, out_dir / "rl_curves.png", metrics=plots.PPO_CURVE_METRICS)
        lines += ["PPO (RL(DialogueNLI)): mean reward, KL to the SFT model, clip fraction, value loss.", "",
                  "![PPO curves](rl_curves.png)", ""]
    judge_results = run / JUDGE_DIR / "judge_results.json"
    if judge_results.exists():
        lines += ["## LLM judge on the test turns", "", plots.judge_markdown(json.loads(judge_results.read_text())), ""]
    lines += ["## Stages", ""]
    for stage in ("sft", "nli", "rl", "prefs", "dpo"):
        done = run / stage / "DONE"
        if done.exists():
            info = json.loads(done.read_text())
            shown = {k: v for k, v in info.items() if not isinstance(v, (dict, list))}
            lines.append(f"- **{stage}**: " + ", ".join(f"{k} = {v}" for k, v in shown.items()))
    prefs_summary = run / "prefs" / "summary.json"
    if prefs_summary.exists():
        lines += ["", "Pseudo-preference summary:", "", "```json", prefs_summary.read_text().strip(), "```"]
    lines += ["", f"Config: `{run / 'config.yaml'}`", ""]
    return atomic_write_text(out_dir / "summary.md", "\n".join(lines))


def stage_table() -> dict[str, Callable[[RunConfig], Any]]:
    """Every stage the pipeline can run, in pipeline order."""
    return {
        "sft": run_sft,
        "train-nli": run_train_nli,
        "rl": run_rl,
        "make-prefs": make_prefs,
        "dpo": run_dpo,
        "eval-sft": lambda config: run_eval(config, "sft"),
        "eval-rl": lambda config: run_eval(config, "rl"),
        "eval-dpo": lambda config: run_eval(config, "dpo"),
        "test-responses": write_test_responses,
        "judge": judge_test_responses,
        "export-hf": run_export,
        "summary": lambda config: primary_decides(lambda: str(write_summary(config))),
    }


ALL_STAGES = tuple(stage_table())
STAGE_NAMES = ("sft", "make-prefs", "dpo", "eval-sft", "eval-dpo", "test-responses", "judge", "export-hf",
               "summary")  # the default run


def stages_to_run(config: RunConfig, requested: str | None = None) -> tuple[str, ...]:
    """The stages of `--stages` (comma-separated), else of `pipeline.stages`, else the default
    list; in pipeline order whatever order they were named in."""
    if requested is not None:
        names, where = [s.strip() for s in requested.split(",") if s.strip()], "--stages"
    elif config.pipeline.stages is not None:
        names, where = list(config.pipeline.stages), "pipeline.stages"
    else:
        return STAGE_NAMES
    unknown = [name for name in names if name not in ALL_STAGES]
    if unknown:
        error = UsageError if where == "--stages" else ConfigError
        raise error(f"{where}: unknown stage(s) {unknown}; choose from {', '.join(ALL_STAGES)}")
    return tuple(name for name in ALL_STAGES if name in names)


def run_pipeline(config: RunConfig, stages: tuple[str, ...] | None = None) -> Path:
    stages = stages_to_run(config) if stages is None else stages
    build_mesh(config)  # joins a multi-host run before anything else touches JAX
    write_resolved_config(config)
    table = stage_table()
    for name in stages:
        print(f"== pipeline stage {name}")
        table[name](config)
    summary = Path(config.run_dir) / "summary" / "summary.md"
    if is_primary():
        atomic_write_json(Path(config.run_dir) / "pipeline.json", {"stages": list(stages), "summary": str(summary)})
    print(f"pipeline: summary in {summary}")
    return summary


def main(argv: list[str]) -> int:
    parser = stage_parser(
        "pdpo pipeline",
        "SFT -> pseudo-preferences -> DPO -> DNLI evaluation of SFT and DPO -> their responses to the test turns -> "
        "the LLM judge on them (skipped unless judge.model is set; the key comes from the environment variable "
        "judge.api_key_env names) -> export-hf -> summary, in <run_dir>. Finished stages are skipped on rerun.",
        epilog=f"Stages, in pipeline order: {', '.join(ALL_STAGES)}; the default run: {', '.join(STAGE_NAMES)} "
               "(pipeline.stages in the config sets another). Overrides are dotted config keys, e.g. sft.epochs=1.",
    )
    parser.add_argument("--stages", help="comma-separated stages to run, in pipeline order "
                                         "(default: pipeline.stages of the config, else the default run)")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    stages = stages_to_run(config, args.stages)
    with claim_run_dir(config):
        run_pipeline(config, stages)
    return 0
