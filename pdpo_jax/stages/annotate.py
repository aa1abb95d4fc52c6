"""`pdpo annotate`: a pairwise human study of the pairs the LLM judge compares, start to finish.

    pdpo annotate init --db study.db --pairs runs/x/judge [--sample 100] [--language ja]
    pdpo annotate add-annotator --db study.db alice          # prints alice's personal link
    pdpo annotate serve --db study.db [--host 127.0.0.1] [--port 8000]
    pdpo annotate export --db study.db --out votes.jsonl
    pdpo annotate report --db study.db --judge runs/x/judge --out report.json

The pieces live in `pdpo_jax.annotation`; this module only reads the command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pdpo_jax.annotation.errors import StudyError
from pdpo_jax.annotation.items import SOURCES_HELP, sample_items, study_items
from pdpo_jax.annotation.server import DEFAULT_HOST, DEFAULT_PORT, serve
from pdpo_jax.annotation.store import LANGUAGES, Study
from pdpo_jax.annotation.study_report import report_markdown, study_report, write_report
from pdpo_jax.object_store import is_object_store
from pdpo_jax.storage import atomic_write_jsonl
from pdpo_jax.stage_runner import StageParser, stage_parser

PROG = "pdpo annotate"
DESCRIPTION = (
    "A pairwise human evaluation: annotators open a personal link, read the persona and the dialogue beside two "
    "models' responses, and pick the better response or a draw. The study lives in one SQLite file (--db)."
)
EPILOG = """\
a study from start to finish:
  1. init           the items: the pairs a `pdpo judge` output folder holds (the same pairs the
                    judge saw), or every turn two responses files share
  2. add-annotator  once per person: prints their link (shown once; only its hash is stored)
  3. serve          the web page behind the links, on 127.0.0.1 unless --host says otherwise
  4. export         every vote as JSON lines
  5. report         the paper's Table 3 beside the judge, human-judge agreement, Krippendorff's
                    alpha and Fleiss' kappa, a bar plot

Run `pdpo annotate COMMAND --help` for what each command needs."""


def build_parser() -> StageParser:
    parser = stage_parser(PROG, DESCRIPTION, config="none", epilog=EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=StageParser)

    def command(name: str, text: str, epilog: str | None = None) -> StageParser:
        sub = commands.add_parser(name, help=text, description=text, epilog=epilog, prog=f"{PROG} {name}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--db", required=True, metavar="STUDY.db", help="the study's SQLite file")
        return sub

    init = command("init", "create a study database from the pairs to compare", epilog=(
        "--pairs runs/x/judge                     the pairs a judge output folder holds, A and B as the judge had them\n"
        "--pairs dpo.jsonl sft.jsonl              every id both responses files answer; A = the first file's model\n"
        "--pairs wo-shuffle=runs/y/.../dpo.jsonl runs/x/.../dpo.jsonl   NAME=FILE names a file's model"))
    init.add_argument("--pairs", nargs="+", required=True, metavar="SOURCE", help=SOURCES_HELP)
    init.add_argument("--sample", type=int, metavar="N", help="keep N of the pairs, picked with --seed (default: all)")
    init.add_argument("--seed", type=int, default=0,
                      help="seed of --sample and of every annotator's item order and sides (default: %(default)s)")
    init.add_argument("--language", choices=LANGUAGES, default="en",
                      help="language of the page and its instructions (default: %(default)s)")

    add = command("add-annotator", "add an annotator and print their personal link")
    add.add_argument("name", help="the annotator's name, as exports and reports show it")
    add.add_argument("--url", default=f"http://{DEFAULT_HOST}:{DEFAULT_PORT}", metavar="URL",
                     help="where the study is served, as annotators reach it (default: %(default)s)")
    add.add_argument("--reissue", action="store_true",
                     help="a new link for an existing annotator: the old link stops working, the votes stay")

    served = command("serve", "serve the annotation page until Ctrl-C")
    served.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default: %(default)s, this machine only; anything else is "
                             "reachable from the network without encryption)")
    served.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help="port (default: %(default)s; 0 = any free port)")

    export = command("export", "write every vote as JSON lines")
    export.add_argument("--out", required=True, metavar="VOTES.jsonl", help="output file")
    export.add_argument("--history", action="store_true",
                        help="include the votes annotators later changed (current: false) (default: current votes only)")

    report = command("report", "the study's report, beside the judge's verdicts on the same pairs")
    report.add_argument("--judge", metavar="JUDGE_OUTPUT", help="a `pdpo judge` output folder (or its judgments.jsonl)")
    report.add_argument("--out", required=True, metavar="REPORT.json",
                        help="report JSON; REPORT.md (the table) and REPORT.png (the bar plot) go beside it")
    return parser


def port_number(text: str) -> int:
    """A TCP port, 0 to 65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535)")
    return port


def _output_file(path: str, example: str) -> str:
    """`path` where an output file can go: not a folder (the error would name a temporary file)."""
    if os.path.isdir(path):
        raise StudyError(f"{path}: is a folder; --out takes a file name (e.g. {os.path.join(path, example)})")
    return path


def init(args: argparse.Namespace) -> int:
    items = sample_items(study_items(args.pairs), args.sample, args.seed)
    study = Study.create(args.db, items, language=args.language, seed=args.seed)
    models = sorted({m for item in items for m in (item.model_a, item.model_b)})
    print(f"{study.path}: {len(items)} items comparing {', '.join(models)}; add annotators with "
          f"`{PROG} add-annotator --db {study.path} NAME`")
    return 0


def add_annotator(args: argparse.Namespace) -> int:
    token = Study(args.db).add_annotator(args.name, reissue=args.reissue)
    print(f"{args.url.rstrip('/')}/a/{token}/")
    print(f"(the link of {args.name}: it is shown only now; `--reissue` makes a new one)", file=sys.stderr)
    return 0


def serve_study(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    serve(Study(args.db), args.host, args.port, announce=lambda line: print(line, flush=True))
    return 0


def export_votes(args: argparse.Namespace) -> int:
    votes = Study(args.db).votes(history=args.history)
    rows = [{"item": v.item, "id": v.example_id, "annotator": v.annotator, "shown": list(v.shown),
             "winner": v.winner, "time": v.time, **({"current": v.current} if args.history else {})} for v in votes]
    atomic_write_jsonl(_output_file(args.out, "votes.jsonl"), rows)
    print(f"{args.out}: {len(rows)} votes")
    return 0


def report_study(args: argparse.Namespace) -> int:
    _output_file(args.out, "report.json")
    report = study_report(Study(args.db), judge=args.judge)
    written = write_report(report, args.out)
    print(report_markdown(report))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


COMMANDS = {"init": init, "add-annotator": add_annotator, "serve": serve_study, "export": export_votes,
            "report": report_study}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if is_object_store(args.db):  # SQLite needs a file system; the pairs, judge folder and --out may be gs://
        raise StudyError(f"{args.db}: the study database is a SQLite file and must be on local disk "
                         "(copy it to or from a bucket with `gcloud storage cp`)")
    return COMMANDS[args.command](args)
