"""`pdpo plan`: does a config fit its TPU slice? Compiles the run's programs for the slice ahead of
time, without a TPU and without weights, and reports per-chip memory, FLOPs, lower-bound step
times and the projected time of one epoch of each stage. Exits with status 2, naming the program
and its bytes, when one does not fit.
"""

from __future__ import annotations

import json
from pathlib import Path

from pdpo_jax.errors import UsageError
from pdpo_jax.storage import atomic_write_json
from pdpo_jax.planning.programs import PROGRAMS, Shapes
from pdpo_jax.planning.report import DoesNotFit, plan_run, refusal_message, render_text
from pdpo_jax.planning.slices import parse_slice, slice_of_config_comment
from pdpo_jax.stage_runner import config_from_args, stage_parser

DESCRIPTION = (
    "Check that a run config fits its TPU slice, on any machine: the SFT and DPO train steps, the sampler's "
    "prefill and decode step and the DNLI scorer are compiled ahead of time by the TPU compiler (libtpu, no TPU "
    "needed) at the config's shapes and mesh, one device per chip as a run sees the slice. Prints per-chip memory "
    "(arguments + outputs - aliased + temporaries) against the chip's HBM, FLOPs, roofline lower-bound times and "
    "the time of one epoch of each stage. Needs --config (the slice is the `TPU slice:` of the config's first "
    "comment line unless --topology names one) and model.path as a local model directory or one of the paper "
    "models whose config.json ships with pdpo_jax. Exit status 2 when a program does not fit. The compiler's "
    "figures of each program are kept under ~/.cache/pdpo_jax/plan-analyses, so planning the same program again "
    "does not compile it (PDPO_PLAN_CACHE=0 compiles everything)."
)


def build_parser():
    parser = stage_parser("pdpo plan", DESCRIPTION)
    parser.add_argument("--topology", metavar="SLICE",
                        help="TPU slice to plan for, e.g. v4-32, v5p-16, v5e-8, v6e-4 (default: the config's comment)")
    parser.add_argument("--programs", default=",".join(PROGRAMS),
                        help=f"comma-separated programs to compile (default: all of {','.join(PROGRAMS)})")
    parser.add_argument("--examples", type=int, help="training examples per epoch (default: counted in data.train, "
                        "else the published size of the paper's corpus)")
    defaults = Shapes()
    parser.add_argument("--response-tokens", type=int, default=defaults.response_tokens,
                        help=f"longest scored response of an SFT row or DPO chosen, in tokens (default {defaults.response_tokens})")
    parser.add_argument("--dnli-rows", type=int, default=defaults.dnli_rows,
                        help=f"DNLI examples per scorer call (default {defaults.dnli_rows}, eval-dnli's --batch-examples)")
    parser.add_argument("--dnli-length", type=int, default=defaults.dnli_row_length,
                        help=f"tokens of a DNLI row, prompt + 31 candidates (default {defaults.dnli_row_length})")
    parser.add_argument("--dnli-scored", type=int, default=defaults.dnli_scored,
                        help=f"scored candidate tokens of a DNLI row (default {defaults.dnli_scored})")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of text")
    parser.add_argument("--out", help="also write the JSON plan to this file")
    return parser


def _slice_name(args, config_files: list[str]) -> str:
    if args.topology:
        return args.topology
    for path in reversed(config_files):
        first = Path(path).read_text(encoding="utf-8").splitlines()[:1]
        name = slice_of_config_comment(first[0]) if first else None
        if name:
            return name
    raise UsageError(f"no TPU slice: {config_files[-1]} names none in its first line (`# ... TPU slice: v4-32 ...`); "
                     "give --topology")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    tpu = parse_slice(_slice_name(args, args.config))
    shapes = Shapes(response_tokens=args.response_tokens, dnli_rows=args.dnli_rows,
                    dnli_row_length=args.dnli_length, dnli_scored=args.dnli_scored)
    programs = [name.strip() for name in args.programs.split(",") if name.strip()]
    plan = plan_run(config, tpu, config_name=" + ".join(args.config), programs=programs, shapes=shapes,
                    examples=args.examples)
    if args.out:
        atomic_write_json(args.out, plan)
    print(json.dumps(plan, indent=2) if args.json else render_text(plan))
    if not plan["fits"]:
        raise DoesNotFit(refusal_message(plan))
    return 0
