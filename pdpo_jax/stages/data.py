"""`pdpo data download` (fetch, verify and unpack the public data sets) and `pdpo data inspect`
(what a data file holds, as the readers see it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from pdpo_jax.data import download as download_module
from pdpo_jax.data.dnli import PROTOCOLS
from pdpo_jax.data.download import DEFAULT_WHAT, SOURCES, configured_sources, fetch
from pdpo_jax.data.inspect import inspect_file
from pdpo_jax.errors import UsageError
from pdpo_jax.object_store import as_path, reported
from pdpo_jax.prefs.summary import folder_overview, is_prefs_folder
from pdpo_jax.stage_runner import StageParser, stage_parser


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or name not in SOURCES:
            raise UsageError(f"{flag} takes NAME=VALUE with NAME one of {', '.join(SOURCES)}; "
                             f"got {value!r}")
        pairs[name] = rest
    return pairs


def _source_for_archive(path: Path, what: list[str] | None) -> str:
    if what:
        if len(what) != 1:
            raise UsageError("--from-archive installs one data set; give one --what")
        return what[0]
    for name, source in SOURCES.items():
        if path.name == source.archive_name:
            return name
    raise UsageError(f"cannot tell which data set {path.name} is; add --what NAME")


def build_parser() -> StageParser:
    parser = stage_parser("pdpo data", "Fetch and verify the public data sets; inspect a data file.", config="none",
                          epilog=None)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=StageParser)
    dl = commands.add_parser(
        "download", help="download, verify and unpack data sets",
        description=download_module.__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    dl.add_argument("--out", required=True, type=as_path,
                    help="folder to install into, local or gs:// (configs read data/...)")
    dl.add_argument("--what", nargs="+", choices=list(SOURCES), default=None,
                    help=f"data sets to install (default: {' '.join(DEFAULT_WHAT)}; jpersonachat needs "
                         f"--accept-ntt-license or --from-archive)")
    dl.add_argument("--from-archive", type=as_path, default=None,
                    help="install from a file downloaded by hand instead of the network")
    dl.add_argument("--force", action="store_true", help="download and unpack again even if already present")
    dl.add_argument("--url", action="append", default=[], metavar="NAME=URL", help="fetch NAME from a mirror")
    dl.add_argument("--archive-sha256", action="append", default=[], metavar="NAME=HEX",
                    help="expected sha256 of NAME's archive (empty: do not check the archive, e.g. a repack)")
    dl.add_argument("--accept-ntt-license", action="store_true",
                    help="you have read and accept the JPersonaChat licence (needed to download it)")
    dl.add_argument("--retries", type=int, default=3, help="attempts per download (default 3)")
    dl.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a try fails")
    dl.add_argument("--quiet", action="store_true", help="no progress bar")
    inspect = commands.add_parser(
        "inspect", help="what a data file holds, as the readers see it (JSON)",
        description="For each file: the detected format, its counts (dialogues, persona lines, turns, examples; "
                    "DNLI examples and candidates per example under --protocol; NLI pairs per label) and the "
                    "first example as the readers see it, as JSON. Run it first on a new corpus. A make-prefs "
                    "folder (<run_dir>/prefs) shows its pairs per split, those its pair filters keep and each "
                    "filter's counts.")
    inspect.add_argument("files", nargs="+", metavar="FILE", help="data files (any supported format) or prefs folders")
    inspect.add_argument("--protocol", choices=PROTOCOLS, default="31", help="DNLI candidate protocol (default 31)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        shown = []
        for path in args.files:
            with reported(path):  # a gs:// path without access or endpoint: one line naming it
                shown.append(folder_overview(path) if is_prefs_folder(path) else inspect_file(path, args.protocol))
        print(json.dumps(shown, indent=2, ensure_ascii=False))
        return 0
    sources = configured_sources(_pairs(args.url, "--url"), _pairs(args.archive_sha256, "--archive-sha256"))
    if args.from_archive is not None:
        jobs = [(_source_for_archive(args.from_archive, args.what), args.from_archive)]
    else:
        jobs = [(name, None) for name in (args.what or DEFAULT_WHAT)]
    for name, archive in jobs:
        fetch(sources[name], args.out, from_archive=archive, force=args.force,
              accept_license=args.accept_ntt_license, retries=args.retries, timeout_s=args.timeout,
              progress=not args.quiet)
    return 0
