"""`pdpo pipeline`: SFT -> make-prefs -> DPO -> DNLI evaluation of both models -> both models'
responses to the test turns -> the LLM judge on them (when the config names a judge model) ->
export-hf -> results summary, inside one run directory.

The steps are declared in `pdpo_jax.stages.PIPELINE_STEPS`: each calls the same function as its
`pdpo <stage>` command. Each stage writes its own folder and a `DONE` marker last; a rerun skips
finished stages and resumes the unfinished one where it stopped. `--stages` (or `pipeline.stages`
in the config) runs another list, always in pipeline order: e.g. only the evaluation, or the
RL(DialogueNLI) baseline `sft, train-nli, rl, eval-sft, eval-rl, summary`
(configs/paper/variants/rl-dnli.yaml).
"""

from __future__ import annotations

from pathlib import Path

from pdpo_jax.config import ConfigError, RunConfig
from pdpo_jax.errors import UsageError
from pdpo_jax.storage import atomic_write_json
from pdpo_jax.parallel import is_primary
from pdpo_jax.run_layout import RunLayout
from pdpo_jax.stage_runner import build_mesh, claim_run_dir, config_from_args, stage_parser, write_resolved_config
from pdpo_jax.stages import DEFAULT_PIPELINE, PIPELINE_STEPS, default_pipeline

ALL_STAGES = tuple(PIPELINE_STEPS)
STAGE_NAMES = DEFAULT_PIPELINE  # the default run


def stages_to_run(config: RunConfig, requested: str | None = None) -> tuple[str, ...]:
    """The stages of `--stages` (comma-separated), else of `pipeline.stages`, else the default
    list (with `rounds` when dpo.rounds > 1); in pipeline order whatever order they were named in."""
    if requested is not None:
        names, where = [s.strip() for s in requested.split(",") if s.strip()], "--stages"
    elif config.pipeline.stages is not None:
        names, where = list(config.pipeline.stages), "pipeline.stages"
    else:
        return default_pipeline(config)
    unknown = [name for name in names if name not in ALL_STAGES]
    if unknown:
        error = UsageError if where == "--stages" else ConfigError
        raise error(f"{where}: unknown stage(s) {unknown}; choose from {', '.join(ALL_STAGES)}")
    return tuple(name for name in ALL_STAGES if name in names)


def run_pipeline(config: RunConfig, stages: tuple[str, ...] | None = None) -> Path:
    stages = stages_to_run(config) if stages is None else stages
    layout = RunLayout.of(config)
    build_mesh(config)  # joins a multi-host run before anything else touches JAX
    write_resolved_config(config)
    for name in stages:
        print(f"== pipeline stage {name}")
        PIPELINE_STEPS[name](config)
    summary = layout.summary_markdown
    if is_primary():
        atomic_write_json(layout.pipeline_record, {"stages": list(stages), "summary": str(summary)})
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
