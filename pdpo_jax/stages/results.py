"""`pdpo results`: the results table of a reproduction run, from the files the evaluations wrote.

    pdpo results --model base=eval/base/dnli.json --model sft=runs/x/eval/sft/dnli.json \\
        --model pseudo-dpo=runs/x/eval/dpo/dnli.json --reference sft --out results/ \\
        --curves sft=runs/x/sft/metrics.jsonl --curves pseudo-dpo=runs/x/dpo/metrics.jsonl
    pdpo results --conversations talks.jsonl --responses SFT=sft.jsonl --responses PseudoDPO=dpo.jsonl --out results/
    pdpo results --model sft=... --model pseudo-dpo=... --response-metrics sft=runs/x/eval_responses/sft.json \\
        --response-metrics pseudo-dpo=runs/x/eval_responses/dpo.json --out results/
    pdpo results --rounds runs/x --out results/       # a row per round of iterative DPO (dpo.rounds)

The DNLI part (`pdpo_jax.evaluate.results_table`) writes table.json, table.md, dnli.png,
score_shifts.json (and curves.png, ppo_curves.png); the examples part (`pdpo_jax.evaluate.response_examples`)
writes examples.md. `--response-metrics` adds what each model says (`pdpo eval-responses`: C-score,
contradiction and persona-copy rates) beside its DNLI row in table.md (responses.md without
`--model`). The rounds part (`pdpo_jax.evaluate.round_rows`) writes rounds.json and rounds.md.
Any of the parts in one call. Nothing is computed on a model: it reads
the reports of `pdpo eval-dnli` and the outputs of `pdpo generate`.

In a pipeline, the `summary` step writes a run's own summary (`write_run_summary`).
"""

from __future__ import annotations

from pdpo_jax.config import RunConfig
from pdpo_jax.errors import UsageError
from pdpo_jax.evaluate.dnli_stats import DEFAULT_SAMPLES
from pdpo_jax.evaluate.response_examples import read_conversations, read_responses, response_examples_markdown
from pdpo_jax.evaluate.results_table import (read_dnli_result, read_response_report, responses_markdown, results_table,
                                             write_results_table)
from pdpo_jax.evaluate.round_rows import round_rows, rounds_markdown
from pdpo_jax.evaluate.run_summary import write_summary
from pdpo_jax.object_store import AnyPath, as_path
from pdpo_jax.storage import atomic_write_json, atomic_write_text
from pdpo_jax.parallel import primary_decides
from pdpo_jax.run_layout import RunLayout
from pdpo_jax.stage_runner import StageParser, stage_parser


def build_parser() -> StageParser:
    parser = stage_parser(
        "pdpo results", config="none", epilog=None,
        description="The DNLI results table of several models on the same examples (shares with 95% bootstrap "
                    "intervals, exact McNemar tests and paired differences against a reference, log-likelihood "
                    "shifts, a bar chart, training curves) and generated responses side by side.",
    )
    parser.add_argument("--out", type=as_path, required=True, metavar="DIR", help="output folder (or gs://BUCKET/...)")
    dnli = parser.add_argument_group("DNLI table")
    dnli.add_argument("--model", action="append", default=[], metavar="NAME=REPORT.json",
                      help="a model's eval-dnli report (its REPORT.examples.jsonl beside it); repeat, in table order")
    dnli.add_argument("--reference", action="append", metavar="NAME",
                      help="the model paired tests compare against (default: sft); given again, the same tests "
                           "against each further model are added (table.json `paired_against`)")
    dnli.add_argument("--curves", action="append", default=[], metavar="NAME=metrics.jsonl",
                      help="a training stage's metrics.jsonl, drawn into curves.png; repeat for every run")
    dnli.add_argument("--ppo-curves", action="append", default=[], metavar="NAME=metrics.jsonl",
                      help="a pdpo rl run's metrics.jsonl, drawn into ppo_curves.png (mean reward, KL, clip "
                           "fraction, value loss); repeat for every run")
    dnli.add_argument("--bootstrap-samples", type=int, default=DEFAULT_SAMPLES, metavar="N", help="resamples (default: %(default)s)")
    dnli.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the resampling (default: %(default)s)")
    said = parser.add_argument_group("what the models say (beside the DNLI table)")
    said.add_argument("--response-metrics", action="append", default=[], metavar="NAME=REPORT.json",
                      help="a model's pdpo eval-responses report (C-score, contradiction and persona-copy rates, "
                           "distinct-n, length); NAME as its --model to sit beside its DNLI row; repeat")
    examples = parser.add_argument_group("generated examples (the paper's Table 5)")
    examples.add_argument("--conversations", type=as_path, metavar="FILE.jsonl",
                          help='conversations {"id", "persona": [...], "history": [...]} given to pdpo generate --input')
    examples.add_argument("--responses", action="append", default=[], metavar="NAME=FILE.jsonl",
                          help="a model's pdpo generate --output on them; repeat, in column order")
    examples.add_argument("--examples", type=int, default=5, metavar="N", help="how many to show (default: %(default)s)")
    examples.add_argument("--examples-seed", type=int, default=0, metavar="N", help="seed of which are shown (default: %(default)s)")
    rounds = parser.add_argument_group("rounds of iterative DPO (dpo.rounds)")
    rounds.add_argument("--rounds", type=as_path, metavar="RUN_DIR",
                        help="a run directory: a row per DPO round (pairs kept, the model that sampled the negatives, "
                             "the training curve's end, DNLI where the round was ranked) in rounds.md and rounds.json")
    return parser


def named_paths(specs: list[str], flag: str) -> dict[str, AnyPath]:
    named: dict[str, AnyPath] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"{flag} takes NAME=PATH, got {spec!r}")
        if name in named:
            raise UsageError(f"{flag}: the name {name!r} is given twice")
        named[name] = as_path(path)
    return named


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models = named_paths(args.model, "--model")
    curves = named_paths(args.curves, "--curves")
    ppo_curves = named_paths(args.ppo_curves, "--ppo-curves")
    responses = named_paths(args.responses, "--responses")
    said = named_paths(args.response_metrics, "--response-metrics")
    if not models and args.conversations is None and not said and args.rounds is None:
        raise UsageError("give --model NAME=REPORT.json (the DNLI table), --response-metrics NAME=REPORT.json, "
                         "--conversations with --responses (examples), --rounds RUN_DIR (a row per DPO round), "
                         "or any of them")
    if (curves or ppo_curves) and not models:
        raise UsageError("--curves and --ppo-curves go with the DNLI table: give --model too")
    if (args.conversations is None) != (not responses):
        raise UsageError("--conversations and --responses go together")
    references = args.reference or ["sft"]
    for reference in references:
        if models and reference not in models:
            raise UsageError(f"--reference {reference!r} is not one of the --model names {list(models)}")
    if len(set(references)) < len(references):
        raise UsageError(f"--reference: a model is given twice ({references})")
    if args.bootstrap_samples < 1:
        raise UsageError("--bootstrap-samples must be positive")
    written = []
    reports = {name: read_response_report(name, path) for name, path in said.items()}
    if models:
        results = [read_dnli_result(name, path) for name, path in models.items()]
        table = results_table(results, references[0], samples=args.bootstrap_samples, seed=args.seed,
                              also_against=references[1:])
        written += write_results_table(table, results, args.out, curves=curves, ppo_curves=ppo_curves,
                                       responses=reports).values()
    elif reports:
        written.append(atomic_write_text(args.out / "responses.md", responses_markdown(None, reports)))
    if args.conversations is not None:
        conversations = read_conversations(args.conversations)
        by_model = {name: read_responses(path) for name, path in responses.items()}
        text = response_examples_markdown(conversations, by_model, args.examples, args.examples_seed)
        written.append(atomic_write_text(args.out / "examples.md", text))
    if args.rounds is not None:
        rows = round_rows(RunLayout(args.rounds))
        if not rows:
            raise UsageError(f"--rounds {args.rounds}: no DPO round found (no dpo/ folder in that run directory)")
        written.append(atomic_write_json(args.out / "rounds.json", rows))
        written.append(atomic_write_text(args.out / "rounds.md", f"### Rounds of DPO in {args.rounds}\n\n"
                                                                 + rounds_markdown(rows)))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def write_run_summary(config: RunConfig) -> str:
    """The pipeline's `summary` step: `<run_dir>/summary/summary.md`, written by process 0."""
    return primary_decides(lambda: str(write_summary(RunLayout.of(config))))
