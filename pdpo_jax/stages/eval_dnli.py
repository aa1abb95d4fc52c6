"""`pdpo eval-dnli`: rank each Dialogue NLI example's candidates by log-likelihood and report the
share of Hits / Entail / Rand / Contradict picks per data file and overall.

    pdpo eval-dnli --model PATH --data valid_havenot.jsonl valid_likedislike.jsonl --out dnli.json

The scores are journaled beside the report while it runs (dnli.partial.jsonl), so a stopped
evaluation resumes where it stopped when run again (`pdpo_jax.evaluate.score_journal`).

The scoring and the report are `pdpo_jax.evaluate.dnli`; this module reads the command line. In a
pipeline, the steps eval-sft, eval-rl and eval-dpo rank a training stage's best model into
`<run_dir>/eval/<stage>/dnli.json` (`evaluate_run_model`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import jax

from pdpo_jax.config import ConfigError, RunConfig
from pdpo_jax.data.dnli import PROTOCOLS
from pdpo_jax.data.templates import PRESETS
from pdpo_jax.errors import UsageError
from pdpo_jax.evaluate.dnli import DnliSettings, evaluate_dnli, read_subsets, write_outputs
from pdpo_jax.evaluate.report import dnli_markdown
from pdpo_jax.model import load_model
from pdpo_jax.parallel import initialize_distributed, is_primary, make_mesh, primary_decides
from pdpo_jax.run_layout import RunLayout
from pdpo_jax.stage_runner import StageParser, config_from_args, load_for_run, parse_mesh, run_once, stage_parser


def model_label(config: RunConfig, which: str) -> str:
    """The name a stage's model has in the reports: SFT, RL (the RL(DialogueNLI) baseline), DPO, or
    RL+DPO when the pseudo-preferences came from the RL model."""
    if which == "dpo" and config.prefs.from_stage == "rl":
        return "RL+DPO"
    return which.upper()


def evaluate_run_model(config: RunConfig, model: str) -> dict[str, Any]:
    """DNLI ranking of the training stage `model`'s best model, on the run's mesh (every host
    scores its rows of each batch; process 0 writes the report into `<run_dir>/eval/<model>`)."""
    layout = RunLayout.of(config)

    def rank(mesh: Any) -> dict[str, Any]:
        if not config.eval.dnli:
            raise ConfigError("eval.dnli is empty: name the DNLI evaluation files to rank candidates on")
        loaded = load_for_run(layout.trained_model(config, model), config, mesh=mesh)
        settings = DnliSettings(protocol=config.eval.protocol, template=config.data.template,
                                scoring="mean" if config.eval.length_normalized else "sum",
                                max_examples=config.eval.max_examples)
        report, records = evaluate_dnli(loaded, config.eval.dnli, settings, mesh=mesh,
                                        model_name=model_label(config, model), show_progress=is_primary(),
                                        resume_from=layout.dnli_report(model))
        if is_primary():
            write_outputs(report, records, layout.dnli_report(model))
        return report

    return run_once(config, f"eval-{model}", layout.evaluation(model), rank, done_record=lambda _: {"model": model},
                    when_finished=lambda _: primary_decides(lambda: json.loads(layout.dnli_report(model).read_text())))


def build_parser() -> StageParser:
    parser = stage_parser(
        "pdpo eval-dnli",
        "Rank Dialogue NLI candidates by log-likelihood and report Hits/Entail/Rand/Contradict@1 per data file and "
        "overall (REPORT.json + .md + .png + .examples.jsonl); a stopped run resumes from the scores it "
        "journaled in REPORT.partial.jsonl. A --config gives model.path, eval.dnli, "
        "eval.protocol, eval.length_normalized, eval.max_examples, data.template, model.dtype and the mesh; "
        "flags win over it.",
        config="optional",
    )
    parser.add_argument("--model", help="model: a Hugging Face directory, a checkpoint dir load_model reads, or 'default' (the default)")
    parser.add_argument("--tokenizer", help="tokenizer directory when the model directory has none")
    parser.add_argument("--name", help="model name shown in the report (default: the model path)")
    parser.add_argument("--data", nargs="+", metavar="FILE", help="DNLI .jsonl files; each is a subset named by its stem")
    parser.add_argument("--out", required=True, help="report JSON path; .md, .png and .examples.jsonl go beside it")
    parser.add_argument("--protocol", choices=PROTOCOLS, help="31: gold + first 10 of each group; all: every candidate (default 31)")
    parser.add_argument("--length-normalized", action="store_true", default=None,
                        help="rank by the per-token mean log-likelihood instead of the sum")
    parser.add_argument("--no-end-of-turn", dest="end_of_turn", action="store_false",
                        help="score the candidate tokens only, without the end-of-turn token that closes a response")
    parser.add_argument("--template", help="prompt template: a preset (%s) or a YAML file (default chat-en)" % ", ".join(PRESETS))
    parser.add_argument("--batch-examples", type=int, default=8, help="examples (rows) per jitted call (default 8)")
    parser.add_argument("--bucket", type=int, default=128, help="row lengths are padded to a multiple of this (default 128)")
    parser.add_argument("--max-examples", type=int, help="score only the first N examples of each file")
    parser.add_argument("--max-length", type=int, help="longest prompt + candidate; older history is dropped beyond "
                        "(default: the model's maximum position)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (parameters stay float32)")
    parser.add_argument("--mesh", help="data=N,fsdp=N,tensor=N to score on a device mesh, or none")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _settings_from_args(args: argparse.Namespace) -> tuple[str, list[str], DnliSettings, str | None, dict | None]:
    """(model path, data files, settings, compute dtype, mesh sizes) from flags over the run config."""
    model_path, data, protocol, normalized, template, max_examples, dtype, mesh = (
        "default", [], "31", False, "chat-en", None, None, None)
    config = config_from_args(args)
    if config is not None:
        model_path, data, protocol = config.model.path, list(config.eval.dnli), config.eval.protocol
        normalized, template, max_examples = config.eval.length_normalized, config.data.template, config.eval.max_examples
        dtype = config.model.dtype
        mesh = {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor}
    model_path = args.model or model_path
    data = args.data or data
    if not data:
        raise UsageError("no DNLI files: give --data FILE ... or eval.dnli in --config")
    settings = DnliSettings(
        protocol=args.protocol or protocol,
        scoring="mean" if (normalized if args.length_normalized is None else args.length_normalized) else "sum",
        template=args.template or template,
        end_of_turn=args.end_of_turn,
        batch_examples=args.batch_examples,
        bucket=args.bucket,
        max_examples=args.max_examples if args.max_examples is not None else max_examples,
        max_length=args.max_length,
    )
    if args.mesh is not None:
        mesh = parse_mesh(args.mesh)
    return model_path, data, settings, args.dtype or dtype, mesh


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    initialize_distributed()  # before any other JAX call; a no-op on one machine
    model_path, data, settings, dtype, mesh_sizes = _settings_from_args(args)
    read_subsets(data, settings.protocol)  # bad files fail before the model loads
    mesh = make_mesh(**mesh_sizes) if mesh_sizes is not None else None
    model = load_model(model_path, mesh=mesh, compute_dtype=dtype, tokenizer=args.tokenizer)
    first = jax.process_index() == 0
    report, records = evaluate_dnli(model, data, settings, mesh=mesh, model_name=args.name or model_path.rstrip("/"),
                                    show_progress=first and not args.quiet, resume_from=args.out)
    if first:
        paths = write_outputs(report, records, args.out)
        print(dnli_markdown(report))
        print(f"{report['candidates']} candidates in {report['seconds']:.1f} s "
              f"({report['candidates_per_second']} candidates/s); wrote {paths['json']}, {paths['markdown'].name}, "
              f"{paths['plot'].name}, {paths['examples'].name}")
    return 0
