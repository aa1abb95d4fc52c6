"""`pdpo eval-nli`: an NLI classifier's accuracy on labelled sentence pairs, per class and overall.

    pdpo eval-nli --model runs/x/nli/classifier --data nli-dev.txt [--out report.json]

Prints the report as JSON (`pdpo_jax.evaluate.nli_accuracy`); `--out` also writes it, atomically.
"""

from __future__ import annotations

import json

from pdpo_jax.data import read_nli_pairs
from pdpo_jax.evaluate.nli_accuracy import evaluate_nli
from pdpo_jax.storage import atomic_write_json
from pdpo_jax.model.classifier import load_classifier
from pdpo_jax.parallel import initialize_distributed, is_primary, make_mesh
from pdpo_jax.stage_runner import parse_mesh, stage_parser

DESCRIPTION = ("Accuracy of an NLI classifier (a `pdpo train-nli` classifier/ or best/ folder, or any Hugging Face "
               "*ForSequenceClassification directory with contradiction/neutral/entailment labels) on labelled "
               "sentence pairs: `s1</s>s2</s>label` lines or the official Dialogue NLI jsonl. Prints JSON: accuracy "
               "overall and per class, and the confusion matrix.")


def build_parser():
    parser = stage_parser("pdpo eval-nli", DESCRIPTION, config="none", epilog=None)
    parser.add_argument("--model", required=True, help="the classifier directory")
    parser.add_argument("--data", required=True, nargs="+", metavar="FILE", help="labelled NLI pair files")
    parser.add_argument("--out", help="also write the report to this JSON file")
    parser.add_argument("--max-length", type=int, default=128, help="tokens of a pair; longer ones keep their end (default 128)")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per jitted call (default 32)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (parameters stay float32)")
    parser.add_argument("--mesh", default="none", help="data=N,fsdp=N,tensor=N to run on a device mesh (default none)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    initialize_distributed()
    pairs = [pair for path in args.data for pair in read_nli_pairs(path)]  # bad files fail before the model loads
    sizes = parse_mesh(args.mesh)
    mesh = make_mesh(**sizes) if sizes is not None else None
    classifier = load_classifier(args.model, mesh=mesh, compute_dtype=args.dtype)
    report = evaluate_nli(classifier, pairs, max_length=args.max_length, rows=args.batch_size, mesh=mesh)
    report["data"] = [str(path) for path in args.data]
    if is_primary():
        if args.out:
            atomic_write_json(args.out, report)
        print(json.dumps(report, indent=2))
    return 0
