"""`pdpo eval-responses`: what a model says, measured with the NLI classifier: C-score,
contradiction rate, persona-copy rate, distinct-1/2 and mean length of a responses file
(`pdpo_jax.evaluate.response_metrics` defines each).

    pdpo eval-responses --responses runs/x/test_responses/dpo.jsonl --classifier runs/x/nli/classifier --out dpo.json
    pdpo eval-responses --config run.yaml          # every trained model's test responses of the run

With `--config`, each file of `<run_dir>/test_responses/` is measured into
`<run_dir>/eval_responses/<model>.json` (+ a table of all in `responses.md`) with the run's
classifier (`rl.classifier`, else `<run_dir>/nli/classifier`); in a pipeline this is the step
after test-responses, skipped when the run has no classifier (neither `rl.classifier` nor
`nli.pairs` set).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pdpo_jax.config import ConfigError, RunConfig
from pdpo_jax.errors import UsageError
from pdpo_jax.evaluate.dnli_stats import DEFAULT_SAMPLES
from pdpo_jax.evaluate.response_metrics import (read_response_file, response_metrics, response_metrics_markdown,
                                                sentence_labels)
from pdpo_jax.model.classifier import load_classifier
from pdpo_jax.model.digest import model_digest
from pdpo_jax.nli import NliReward
from pdpo_jax.parallel import initialize_distributed, is_primary, make_mesh, primary_decides
from pdpo_jax.run_layout import RESPONDING_MODELS, RunLayout
from pdpo_jax.stage_runner import (StageParser, claim_run_dir, config_from_args, finished, parse_mesh, run_once,
                                  stage_parser)
from pdpo_jax.storage import atomic_write_json, atomic_write_text

NLI_MAX_LENGTH = 128  # tokens of a (persona sentence, response) pair, as `nli.max_length` defaults


def measure(responses_path: Path, reward: NliReward, digest: str, *, samples: int, seed: int) -> dict[str, Any]:
    """One responses file's report, with where it came from."""
    responses = read_response_file(responses_path)
    report = response_metrics(responses, sentence_labels(reward, responses), samples=samples, seed=seed)
    return {**report, "file": str(responses_path),
            "classifier": {"path": str(reward.classifier.path), "digest": digest}}


def classifier_configured(config: RunConfig) -> bool:
    """Whether the run has an NLI classifier to measure with: named, or trained by `pdpo train-nli`."""
    return bool(config.rl.classifier or config.nli.pairs)


def evaluate_run_responses(config: RunConfig, *, samples: int = DEFAULT_SAMPLES, seed: int | None = None
                           ) -> dict[str, Any] | None:
    """The pipeline step: every trained model's test responses measured into
    `<run_dir>/eval_responses/` (pairs cut at `nli.max_length` tokens; bootstrap seed: `seed`, else
    the run's); None after a one-line reason when the run has no classifier."""
    layout = RunLayout.of(config)
    if not classifier_configured(config) and not finished(layout.response_metrics_dir):
        print("eval-responses: skipped, the run has no NLI classifier (set rl.classifier, or nli.pairs to train one)")
        return None

    def work(mesh: Any) -> dict[str, Any]:
        path = layout.rl_classifier(config)
        if not path.is_dir():
            raise ConfigError(f"eval-responses: the NLI classifier {path} is not a directory; run `pdpo train-nli` "
                              "first or set rl.classifier")
        files = {stage: layout.responses(stage) for stage in RESPONDING_MODELS if layout.responses(stage).exists()}
        if not files:
            raise ConfigError(f"eval-responses: no responses in {layout.test_responses}; run the test-responses "
                              "stage first")
        classifier = load_classifier(path, mesh=mesh, compute_dtype=config.model.dtype)
        reward = NliReward(classifier, max_length=config.nli.max_length, mesh=mesh)
        digest = model_digest(classifier)
        reports = {stage: measure(file, reward, digest, samples=samples, seed=config.seed if seed is None else seed)
                   for stage, file in files.items()}
        if is_primary():
            for stage, report in reports.items():
                atomic_write_json(layout.response_metrics(stage), report)
            atomic_write_text(layout.response_metrics_dir / "responses.md", response_metrics_markdown(
                [(RESPONDING_MODELS[stage], report) for stage, report in reports.items()]))
        return reports

    def finished_reports(_folder: Path) -> dict[str, Any]:
        return primary_decides(lambda: {stage: json.loads(layout.response_metrics(stage).read_text())
                                        for stage in RESPONDING_MODELS if layout.response_metrics(stage).exists()})

    return run_once(config, "eval-responses", layout.response_metrics_dir, work, when_finished=finished_reports,
                    done_record=lambda reports: {"models": sorted(reports)},
                    result_line=lambda reports: "eval-responses: " + ", ".join(
                        f"{stage} C-score {r['c_score']['value']:.1f}" for stage, r in reports.items()
                        if r["c_score"]["value"] is not None))


def build_parser() -> StageParser:
    parser = stage_parser(
        "pdpo eval-responses",
        "Measure what a model says with an NLI classifier: C-score (per persona sentence x response: +1 entailment, "
        "0 neutral, -1 contradiction; mean per response, mean over responses x 100, 95% bootstrap interval), "
        "contradiction rate, persona-copy rate, distinct-1/2 and mean length of a responses file in the "
        "test-responses format. With --config alone: every trained model's test responses of the run, into "
        "<run_dir>/eval_responses/.",
        config="optional",
    )
    parser.add_argument("--responses", type=Path, metavar="FILE.jsonl",
                        help='responses {"id", "persona": [...], "response", ...}, e.g. <run_dir>/test_responses/dpo.jsonl')
    parser.add_argument("--classifier", type=Path, metavar="DIR",
                        help="the NLI classifier (a `pdpo train-nli` classifier/ folder or any Hugging Face "
                             "*ForSequenceClassification directory with contradiction/neutral/entailment labels)")
    parser.add_argument("--out", type=Path, metavar="REPORT.json", help="where the report goes (with --responses)")
    parser.add_argument("--max-length", type=int, default=NLI_MAX_LENGTH,
                        help="tokens of a (persona sentence, response) pair; longer ones keep their end (default "
                             "%(default)s; with --config: nli.max_length)")
    parser.add_argument("--bootstrap-samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                        help="resamples of the intervals (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling (default %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (parameters stay float32)")
    parser.add_argument("--mesh", default="none", help="data=N,fsdp=N,tensor=N to run on a device mesh (default none)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    if (args.responses is None) == (config is None):
        raise UsageError("give --responses FILE --classifier DIR --out REPORT.json, or --config FILE for a run's "
                         "test responses (not both)")
    if args.bootstrap_samples < 1:
        raise UsageError("--bootstrap-samples must be positive")
    if config is not None:
        with claim_run_dir(config):
            reports = evaluate_run_responses(config, samples=args.bootstrap_samples, seed=args.seed)
        if reports:
            print(response_metrics_markdown([(RESPONDING_MODELS[s], r) for s, r in reports.items()]), end="")
        return 0
    if args.classifier is None or args.out is None:
        raise UsageError("--responses needs --classifier DIR and --out REPORT.json")
    read_response_file(args.responses)  # a bad file fails before the classifier loads
    initialize_distributed()
    sizes = parse_mesh(args.mesh)
    mesh = make_mesh(**sizes) if sizes is not None else None
    classifier = load_classifier(args.classifier, mesh=mesh, compute_dtype=args.dtype)
    reward = NliReward(classifier, max_length=args.max_length, mesh=mesh)
    report = measure(args.responses, reward, model_digest(classifier), samples=args.bootstrap_samples, seed=args.seed)
    if is_primary():
        atomic_write_json(args.out, report)
        print(response_metrics_markdown([(report["model"] or args.responses.stem, report)]), end="")
        print(f"wrote {args.out}")
    return 0
