"""`pdpo judge`: the judge evaluation from the command line.

The settings come from the `judge` section of the run config (`--config FILE`, repeatable, and
`judge.KEY=VALUE` overrides); flags override the config. Errors are raised, not printed; the exit
status is 1 when some judgments failed (a rerun retries exactly those).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys

from pdpo_jax.config import JudgeSection, load_config
from pdpo_jax.evaluate import report
from pdpo_jax.evaluate.judge_prompts import PROMPTS
from pdpo_jax.evaluate.judge_run import JudgeSettings, run_judge, settings_from_section
from pdpo_jax.evaluate.judge_stats import DEFAULT_GAMES
from pdpo_jax.stages.common import StageParser, stage_parser

PROG = "pdpo judge"
DESCRIPTION = (
    "Pairwise LLM-as-judge evaluation of persona dialogue responses against an\n"
    "OpenAI-compatible chat endpoint. The judge explains first, then ends with its verdict:\n"
    "[[1]] (response 1 is better), [[2]] (response 2) or [[3]] (tie)."
)
EPILOG = """\
responses files (jsonl, one per model, matched by id):
  {"id": ..., "persona": [...], "history": [...], "response": "...", "model": "name"}
  (without "model" the file's stem names the model)

settings: the `judge` section of --config files (later files win), then KEY=VALUE
  overrides such as judge.model=gpt-4o judge.base_url=http://localhost:8000/v1 (they may
  stand anywhere on the line), then the flags below. The API key is never a setting: it
  is read from the environment variable named by --api-key-env (judge.api_key_env).

modes:
  pairwise    win/draw/lose of the first file's model (A) against the second's (B)
  tournament  --games random draws of (dialogue, two distinct models); each model's win
              rate = (wins + 0.5 draws) / games, with bootstrap 95% CIs over games, and
              a head-to-head win/draw/lose table

orders "both": each pair is judged in both presentation orders; the same outcome twice
  keeps it, a win (loss) plus a tie is a win (loss), a win plus a loss is a draw.
  The position-consistency rate is reported. Answers without a verdict are asked again
  once; still unparsable or failed pairs are excluded from the counts and reported.

outputs in --out: judge_results.json, judge_results.md, judgments.jsonl (every answer),
  win_rates.png, outcomes.png. Every judge answer is cached (--cache), so a rerun pays
  only for what is missing. Exit status 1: some calls failed; a rerun retries them.
  The API key is never written anywhere."""

DEFAULTS = JudgeSection()
SETTINGS = frozenset(f.name for f in dataclasses.fields(JudgeSettings))
# `--responses` takes every word up to the next option, overrides written after it included.
_OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")


def build_parser() -> StageParser:
    parser = stage_parser(PROG, DESCRIPTION, config="optional", epilog=EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", nargs="+", required=True, metavar="FILE", help="responses jsonl, one per model")
    parser.add_argument("--out", required=True, help="output folder")

    def setting(flag: str, dest: str, text: str, **kwargs) -> None:
        # Absent flags stay out of the namespace, so they leave the config's value alone.
        parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=text, **kwargs)

    setting("--mode", "mode", f"pairwise: exactly two files, A = first; tournament: two or more (default: {DEFAULTS.mode})",
            choices=("pairwise", "tournament"))
    setting("--judge-model", "model", "judge model name sent to the endpoint (or judge.model in a config)", metavar="NAME")
    setting("--base-url", "base_url", "OpenAI-compatible base URL, e.g. http://localhost:8000/v1 (default: the OpenAI API)",
            metavar="URL")
    setting("--api-key-env", "api_key_env", f"environment variable holding the API key (default: {DEFAULTS.api_key_env})",
            metavar="VAR")
    setting("--language", "language", f"judge prompt language (default: {DEFAULTS.language})", choices=sorted(PROMPTS))
    setting("--orders", "orders", "both: judge each pair in both presentation orders and combine; single: one "
            f"seeded random order (default: {DEFAULTS.orders})", choices=("both", "single"))
    setting("--temperature", "temperature", f"judge sampling temperature (default: {DEFAULTS.temperature})", type=float)
    setting("--max-tokens", "max_tokens", f"judge answer length limit (default: {DEFAULTS.max_tokens})", type=int)
    setting("--timeout", "timeout", f"seconds per request (default: {DEFAULTS.timeout})", type=float)
    setting("--concurrency", "concurrency", f"requests in flight at most (default: {DEFAULTS.concurrency})", type=int)
    setting("--max-retries", "max_retries",
            f"retries per request on 429, timeouts and 5xx (default: {DEFAULTS.max_retries})", type=int)
    setting("--backoff-base", "backoff_base",
            f"first backoff in seconds, doubling per retry (default: {DEFAULTS.backoff_base})", type=float)
    setting("--backoff-max", "backoff_max", f"longest backoff in seconds (default: {DEFAULTS.backoff_max})", type=float)
    setting("--cache", "cache", "judge answer cache (jsonl); default: OUT/judge_cache.jsonl")
    setting("--games", "games",
            f"tournament games (default: {DEFAULT_GAMES}, or every (dialogue, model pair) combination if fewer)", type=int)
    setting("--limit", "limit", "pairwise: judge only the first N shared ids", type=int)
    setting("--bootstrap", "bootstrap", f"bootstrap resamples for the CIs (default: {DEFAULTS.bootstrap})", type=int)
    setting("--seed", "seed",
            f"seed for game sampling, single-order coin flips and the bootstrap (default: {DEFAULTS.seed})", type=int)
    setting("--no-plots", "plots", "skip the PNG plots", action="store_false")
    return parser


def split_overrides(responses: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """KEY=VALUE words that `--responses` swallowed go back to the overrides (an existing file stays a file)."""
    files, moved = [], []
    for word in responses:
        if _OVERRIDE.match(word) and not os.path.exists(word):
            moved.append(word)
        else:
            files.append(word)
    return files, [*overrides, *moved]


def settings_from_args(args: argparse.Namespace, overrides: list[str]) -> JudgeSettings:
    section = load_config(args.config or None, overrides).judge
    flags = {name: value for name, value in vars(args).items() if name in SETTINGS}
    return settings_from_section(section, **flags)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    responses, overrides = split_overrides(args.responses, args.overrides)
    settings = settings_from_args(args, overrides)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    results, _ = run_judge(responses, args.out, settings)
    print(report.judge_markdown(results))
    failed = results["status"]["failed"]
    if failed:
        print(f"{PROG}: {failed} judgments failed; rerun to retry them (finished ones are cached)", file=sys.stderr)
        return 1
    return 0

