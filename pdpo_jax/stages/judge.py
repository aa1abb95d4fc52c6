"""`pdpo judge`: the judge evaluation from the command line, and the pipeline's judge stage.

Two ways in: `--responses A.jsonl B.jsonl --out DIR` judges any responses files; `--config FILE`
alone judges the run's test responses (`pdpo test-responses`: PseudoDPO as A against SFT as B)
into `<run_dir>/judge`, as the pipeline's judge stage does. That stage runs only when the config
names a judge model (`judge.model`) and says so in one line otherwise.

The settings come from the `judge` section of the run config (`--config FILE`, repeatable, and
`judge.KEY=VALUE` overrides); flags override the config. Errors are raised, not printed; the exit
status is 1 when some judgments failed (a rerun retries exactly those).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pdpo_jax.config import ConfigError, JudgeSection, RunConfig, load_config
from pdpo_jax.errors import RunFailed, UsageError
from pdpo_jax.evaluate import report
from pdpo_jax.evaluate.judge_prompts import PROMPTS
from pdpo_jax.evaluate.judge_evaluation import JudgeSettings, run_judge, settings_from_section
from pdpo_jax.evaluate.judge_stats import DEFAULT_GAMES
from pdpo_jax.object_store import is_object_store
from pdpo_jax.parallel import is_primary, primary_decides
from pdpo_jax.run_layout import JUDGED_MODELS, RunLayout
from pdpo_jax.serve.in_process import served_in_process
from pdpo_jax.stage_runner import (StageParser, build_mesh, claim_run_dir, finished, model_load_options, run_once,
                                   stage_parser)

PROG = "pdpo judge"
DESCRIPTION = (
    "Pairwise LLM-as-judge evaluation of persona dialogue responses against an\n"
    "OpenAI-compatible chat endpoint. The judge explains first, then ends with its verdict:\n"
    "[[1]] (response 1 is better), [[2]] (response 2) or [[3]] (tie)."
)
EPILOG = """\
a run's test responses: with --config and no --responses, PseudoDPO's answers to the test
  turns (<run_dir>/test_responses/dpo.jsonl, written by `pdpo test-responses`) are judged
  against SFT's (sft.jsonl) into <run_dir>/judge; a finished judge folder is kept.

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
    parser.add_argument("--responses", nargs="+", metavar="FILE",
                        help="responses jsonl, one per model (default: the --config run's test responses)")
    parser.add_argument("--out", help="output folder (required with --responses; a run's judge folder is <run_dir>/judge)")

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


def setting_flags(args: argparse.Namespace) -> dict[str, object]:
    return {name: value for name, value in vars(args).items() if name in SETTINGS}


def settings_from_args(args: argparse.Namespace, overrides: list[str]) -> JudgeSettings:
    section = load_config(args.config or None, overrides).judge
    return settings_from_section(section, **setting_flags(args))


def judge_test_responses(config: RunConfig, **flags: object) -> dict[str, object] | None:
    """The judge stage of a run: PseudoDPO's test responses (A) against SFT's (B), judged into
    `<run_dir>/judge` with the config's `judge` section (`flags` replace its keys). Returns the
    results, or None after a one-line reason when no judge model is named. Raises RunFailed, and
    leaves the stage unfinished, when some judgments failed: a rerun asks for exactly those."""
    layout = RunLayout.of(config)
    if not (flags.get("model") or config.judge.model or config.judge.serve) and not finished(layout.judge):
        print("judge: skipped, the config names no judge model (set judge.model, and judge.base_url for an "
              "endpoint other than the OpenAI API, or judge.serve to serve one here)")
        return None

    def judge(mesh: Any) -> dict[str, object]:
        files = [layout.responses(stage) for stage in JUDGED_MODELS]
        for path in files:
            if not path.exists():
                raise ConfigError(f"judge: {path} not found; run the test-responses stage first")
        outcome: dict[str, object] = {}
        with served_judge(config, mesh) as endpoint:
            if is_primary():  # a served judge's other processes get here once its server has stopped
                try:
                    settings = settings_from_section(config.judge, **{**flags, **endpoint})
                    outcome["value"] = _judge_into(files, layout.judge, settings)
                except Exception as error:  # every process must leave the server before learning of it
                    outcome["error"] = error
        return primary_decides(_value_or_error, outcome)

    return run_once(config, "judge", layout.judge, judge, needs_mesh=bool(config.judge.serve),
                    when_finished=lambda _: primary_decides(lambda: json.loads(layout.judge_results.read_text(encoding="utf-8"))),
                    done_record=lambda results: {key: results[key] for key in ("mode", "counts", "status") if key in results})


def _value_or_error(outcome: dict[str, object]) -> object:
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@contextlib.contextmanager
def served_judge(config: RunConfig, mesh: Any) -> Iterator[dict[str, object]]:
    """With `judge.serve`, that model served by this run's processes over `mesh` (with the run's
    compute dtype and layer layout) on a free loopback port for the block: the settings that point
    the judge at it on process 0, none on the others; without `judge.serve`, no settings."""
    section = config.judge
    if not section.serve:
        yield {}
        return
    name = section.model or "served-judge"
    if is_primary():
        print(f"judge: serving {section.serve} as {name!r} in this run for the judge stage")
    # the run's leave to read pickled weights is for its own models, not for a judge from elsewhere
    load_options = {**model_load_options(config), "allow_pickle": False}
    with served_in_process(section.serve, served_name=name, slots=section.concurrency, mesh=mesh,
                           load_options=load_options) as endpoint:
        if endpoint is None:
            yield {}
        else:
            yield {"model": endpoint.model, "base_url": endpoint.base_url, "api_key_env": endpoint.api_key_env}


def _judge_into(files: list[Path], out_dir: Path, settings: JudgeSettings) -> dict[str, object]:
    named = [str(path) if is_object_store(path) else str(path.resolve()) for path in files]
    results, _ = run_judge(named, out_dir, settings)
    failed = results["status"]["failed"]
    if failed:
        raise RunFailed(f"judge: {failed} judgments failed (see {out_dir / 'judgments.jsonl'}); rerun the stage to "
                        f"retry them, the answers so far are cached")
    return results


def _log_to_stderr() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)


def judge_run(args: argparse.Namespace) -> int:
    """`pdpo judge --config FILE`: the run's judge stage."""
    if not args.config:
        raise UsageError("give --responses A.jsonl B.jsonl --out DIR, or --config FILE to judge a run's test "
                         f"responses (see {PROG} --help)")
    if args.out is not None:
        raise UsageError("--out goes with --responses; a run's judgments are written to <run_dir>/judge")
    config = load_config(args.config, args.overrides)
    _log_to_stderr()
    with claim_run_dir(config):
        results = judge_test_responses(config, **setting_flags(args))
    if results is not None:
        print(report.judge_markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.responses:
        return judge_run(args)
    if args.out is None:
        raise UsageError(f"--responses needs --out DIR (see {PROG} --help)")
    responses, overrides = split_overrides(args.responses, args.overrides)
    settings = settings_from_args(args, overrides)
    _log_to_stderr()
    config = load_config(args.config or None, overrides)
    with served_judge(config, build_mesh(config) if config.judge.serve else None) as endpoint:
        results, _ = run_judge(responses, args.out, dataclasses.replace(settings, **endpoint))
    print(report.judge_markdown(results))
    failed = results["status"]["failed"]
    if failed:
        print(f"{PROG}: {failed} judgments failed; rerun to retry them (finished ones are cached)", file=sys.stderr)
        return 1
    return 0

