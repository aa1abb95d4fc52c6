"""Pairwise LLM-as-judge: which of two responses better fulfils the speaker's persona.

For one test dialogue (the speaker's persona and the history so far) the judge sees two candidate
next turns, writes an explanation, and ends with a verdict: ``[[1]]`` (response 1 is better),
``[[2]]`` (response 2 is better) or ``[[3]]`` (tie).

Orders. LLM judges prefer whichever response they read first (or second), so by default each pair
is judged twice, once in each presentation order, and the two verdicts are combined from model
A's side:

* the same outcome in both orders                  -> that outcome;
* a win (or a loss) in one order and a tie in the other -> the win (or the loss);
* a win in one order and a loss in the other       -> a draw (the judge only followed the position).

The position-consistency rate is the share of pairs, among those with two valid verdicts, whose
two verdicts agree exactly. With ``orders="single"`` each pair is judged once, in an order picked
by a seeded coin flip so that neither model sits in position 1 systematically.

Failures. An answer without a verdict is asked again once (the answer plus a reminder of the
format); if the second answer has none either, that order is "unparsable". A call that still fails
after the retries is "failed". A pair with any failed order is failed, else with any unparsable
order it is unparsable; both kinds are left out of the win/draw/lose counts and reported beside
them. Failed calls are not cached, so a rerun asks for exactly those again.

Counts, win rates and their bootstrap intervals are `judge_stats`.

The API key is read from an environment variable and handed to the client only; nothing written
to disk (cache, results, logs) contains it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from pdpo_jax.atomic import atomic_write_json, atomic_write_jsonl, atomic_write_text, jsonl_objects
from pdpo_jax.evaluate.judge_client import (
    ChatCompleter,
    ClientSettings,
    JudgeCallFailed,
    JudgeConfigError,
    JudgmentCache,
    RetryPolicy,
    cache_key,
)
from pdpo_jax.evaluate.judge_prompts import (
    PROMPTS,
    JudgePrompt,
    Message,
    Outcome,
    build_messages,
    combine_orders,
    format_history,
    parse_verdict,
    prompt_for,
    reask_messages,
    verdict_to_outcome,
)
from pdpo_jax.evaluate.judge_stats import (
    DEFAULT_GAMES,
    bootstrap_win_rates,
    pairwise_summary,
    position_consistency,
    sample_games,
    tournament_summary,
)

LOG = logging.getLogger(__name__)

__all__ = [
    "PROMPTS", "ChatCompleter", "ClientSettings", "JudgeCallFailed", "JudgeConfigError", "JudgePrompt",
    "JudgmentCache", "OrderJudgment", "PairItem", "PairJudge", "PairJudgment", "ResponseSet", "RetryPolicy",
    "bootstrap_win_rates", "build_messages", "build_parser", "cache_key", "combine_orders", "common_ids",
    "format_history", "judge_pairs", "load_responses", "main", "make_item", "pairwise_summary", "parse_verdict",
    "position_consistency", "presentation_orders", "prompt_for", "reask_messages", "run", "sample_games",
    "tournament_summary", "verdict_to_outcome",
]


# --------------------------------------------------------------------------------------------
# Judging pairs


@dataclass(frozen=True)
class ResponseSet:
    """One model's responses to the test dialogues, keyed by example id."""

    model: str
    path: str
    records: dict[str, dict[str, Any]]  # id -> {"persona": [...], "history": [...], "response": str}


def _require_str_list(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise JudgeConfigError(f"{where}: key {key!r} must be a list of strings")
    return value


def load_responses(path: str | os.PathLike) -> ResponseSet:
    """Read a responses jsonl: one object per line with id, persona, history, response and (optionally) model.

    Without a "model" field the file's stem names the model; all lines must name the same model.
    """
    path = Path(path)
    if not path.exists():
        raise JudgeConfigError(f"{path}: responses file not found")
    records: dict[str, dict[str, Any]] = {}
    models: set[str] = set()
    for where, row in jsonl_objects(path, JudgeConfigError):
        for key in ("id", "persona", "history", "response"):
            if key not in row:
                raise JudgeConfigError(f"{where}: missing key {key!r}")
        if not isinstance(row["response"], str):
            raise JudgeConfigError(f"{where}: key 'response' must be a string")
        example_id = str(row["id"])
        if example_id in records:
            raise JudgeConfigError(f"{where}: duplicate id {example_id!r}")
        model = row.get("model", path.stem)
        if not isinstance(model, str) or not model:
            raise JudgeConfigError(f"{where}: key 'model' must be a non-empty string")
        models.add(model)
        records[example_id] = {
            "persona": _require_str_list(row["persona"], where, "persona"),
            "history": _require_str_list(row["history"], where, "history"),
            "response": row["response"],
        }
    if not records:
        raise JudgeConfigError(f"{path}: no responses")
    if len(models) > 1:
        raise JudgeConfigError(f"{path}: lines name different models {sorted(models)}; one file per model")
    return ResponseSet(model=models.pop(), path=str(path), records=records)


def common_ids(sets: Sequence[ResponseSet]) -> list[str]:
    """Ids present in every file (in the first file's order), after checking they show the same dialogue."""
    names = [s.model for s in sets]
    if len(set(names)) != len(names):
        raise JudgeConfigError(f"model names must differ between files, got {names} (set the 'model' field)")
    shared = [i for i in sets[0].records if all(i in s.records for s in sets[1:])]
    if not shared:
        raise JudgeConfigError(f"no example id is shared by all of {[s.path for s in sets]}")
    for example_id in shared:
        first = sets[0].records[example_id]
        for other in sets[1:]:
            record = other.records[example_id]
            for key in ("persona", "history"):
                if record[key] != first[key]:
                    raise JudgeConfigError(
                        f"id {example_id!r}: {key} differs between {sets[0].path} and {other.path}; "
                        f"the files must answer the same dialogues"
                    )
    return shared


@dataclass(frozen=True)
class PairItem:
    """One comparison: model A's and model B's responses to the same dialogue."""

    id: str
    persona: tuple[str, ...]
    history: tuple[str, ...]
    model_a: str
    response_a: str
    model_b: str
    response_b: str


def make_item(example_id: str, a: ResponseSet, b: ResponseSet) -> PairItem:
    ra, rb = a.records[example_id], b.records[example_id]
    return PairItem(
        id=example_id,
        persona=tuple(ra["persona"]),
        history=tuple(ra["history"]),
        model_a=a.model,
        response_a=ra["response"],
        model_b=b.model,
        response_b=rb["response"],
    )


@dataclass(frozen=True)
class OrderJudgment:
    """The judge's answer for one presentation order."""

    a_first: bool
    status: Literal["ok", "unparsable", "failed"]
    verdict: int | None = None
    outcome: Outcome | None = None
    texts: tuple[str, ...] = ()
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "order": "AB" if self.a_first else "BA",
            "status": self.status,
            "verdict": self.verdict,
            "outcome": self.outcome,
            "reasked": len(self.texts) > 1,
            "texts": list(self.texts),
            "error": self.error,
        }


@dataclass(frozen=True)
class PairJudgment:
    item: PairItem
    orders: tuple[OrderJudgment, ...]

    @property
    def status(self) -> str:
        statuses = {o.status for o in self.orders}
        return "failed" if "failed" in statuses else "unparsable" if "unparsable" in statuses else "ok"

    @property
    def outcome(self) -> Outcome | None:
        if self.status != "ok":
            return None
        outcomes = [o.outcome for o in self.orders]
        return outcomes[0] if len(outcomes) == 1 else combine_orders(outcomes[0], outcomes[1])

    @property
    def consistent(self) -> bool | None:
        if self.status != "ok" or len(self.orders) < 2:
            return None
        return self.orders[0].outcome == self.orders[1].outcome

    def as_dict(self) -> dict[str, Any]:
        item = self.item
        return {
            "id": item.id,
            "model_a": item.model_a,
            "model_b": item.model_b,
            "status": self.status,
            "outcome": self.outcome,
            "position_consistent": self.consistent,
            "orders": [o.as_dict() for o in self.orders],
        }


class PairJudge:
    """Asks the judge about one pair in one order, through the cache."""

    def __init__(
        self,
        complete: Callable[[Sequence[Message]], str],
        cache: JudgmentCache,
        prompt: JudgePrompt,
        model: str,
        sampling: Mapping[str, Any],
    ):
        self._complete = complete
        self._cache = cache
        self._prompt = prompt
        self._model = model
        self._sampling = dict(sampling)

    def _ask(self, messages: Sequence[Message]) -> str:
        key = cache_key(self._model, messages, self._sampling)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        text = self._complete(messages)
        self._cache.put(key, text, self._model)
        return text

    def judge(self, item: PairItem, a_first: bool) -> OrderJudgment:
        first, second = (item.response_a, item.response_b) if a_first else (item.response_b, item.response_a)
        messages = build_messages(self._prompt, item.persona, item.history, first, second)
        texts: list[str] = []
        try:
            texts.append(self._ask(messages))
            verdict = parse_verdict(texts[0])
            if verdict is None:
                texts.append(self._ask(reask_messages(self._prompt, messages, texts[0])))
                verdict = parse_verdict(texts[1])
        except JudgeCallFailed as err:
            return OrderJudgment(a_first=a_first, status="failed", texts=tuple(texts), error=str(err))
        if verdict is None:
            return OrderJudgment(a_first=a_first, status="unparsable", texts=tuple(texts))
        return OrderJudgment(
            a_first=a_first, status="ok", verdict=verdict, outcome=verdict_to_outcome(verdict, a_first), texts=tuple(texts)
        )


def presentation_orders(n_items: int, orders: str, seed: int) -> list[tuple[bool, ...]]:
    """Per item, the values of `a_first` to judge: both orders, or one seeded coin flip."""
    if orders == "both":
        return [(True, False)] * n_items
    if orders == "single":
        flips = np.random.default_rng([seed, 1]).integers(0, 2, size=n_items)
        return [(bool(f),) for f in flips]
    raise ValueError(f"orders must be 'both' or 'single', got {orders!r}")


def judge_pairs(
    items: Sequence[PairItem], judge: PairJudge, *, orders: str = "both", concurrency: int = 8, seed: int = 0
) -> list[PairJudgment]:
    """Judge every item in the requested orders with at most `concurrency` requests in flight."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    plan = presentation_orders(len(items), orders, seed)
    tasks = [(index, a_first) for index, firsts in enumerate(plan) for a_first in firsts]
    results: dict[tuple[int, bool], OrderJudgment] = {}
    step = max(1, len(tasks) // 20)
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(judge.judge, items[i], a_first): (i, a_first) for i, a_first in tasks}
        for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            results[futures[future]] = future.result()
            if done % step == 0 or done == len(tasks):
                LOG.info("judged %d/%d", done, len(tasks))
    return [
        PairJudgment(item=item, orders=tuple(results[(i, a_first)] for a_first in plan[i])) for i, item in enumerate(items)
    ]


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdpo judge",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pairwise LLM-as-judge evaluation of persona dialogue responses against an\n"
        "OpenAI-compatible chat endpoint. The judge explains first, then ends with its verdict:\n"
        "[[1]] (response 1 is better), [[2]] (response 2) or [[3]] (tie).",
        epilog="""\
responses files (jsonl, one per model, matched by id):
  {"id": ..., "persona": [...], "history": [...], "response": "...", "model": "name"}
  (without "model" the file's stem names the model)

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
  The API key is read from --api-key-env only and is never written anywhere.""",
    )
    parser.add_argument("--responses", nargs="+", required=True, metavar="FILE", help="responses jsonl, one per model")
    parser.add_argument("--mode", choices=("pairwise", "tournament"), default="pairwise",
                        help="pairwise: exactly two files, A = first; tournament: two or more (default: %(default)s)")
    parser.add_argument("--judge-model", required=True, help="judge model name sent to the endpoint")
    parser.add_argument("--base-url", default=None, help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1 (default: the OpenAI API)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key (default: %(default)s)")
    parser.add_argument("--language", choices=sorted(PROMPTS), default="en", help="judge prompt language (default: %(default)s)")
    parser.add_argument("--orders", choices=("both", "single"), default="both",
                        help="both: judge each pair in both presentation orders and combine; single: one seeded random order (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="judge sampling temperature (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="judge answer length limit (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at most (default: %(default)s)")
    parser.add_argument("--max-retries", type=int, default=6, help="retries per request on 429, timeouts and 5xx (default: %(default)s)")
    parser.add_argument("--backoff-base", type=float, default=1.0, help="first backoff in seconds, doubling per retry (default: %(default)s)")
    parser.add_argument("--backoff-max", type=float, default=60.0, help="longest backoff in seconds (default: %(default)s)")
    parser.add_argument("--cache", default=None, help="judge answer cache (jsonl); default: OUT/judge_cache.jsonl")
    parser.add_argument("--games", type=int, default=None,
                        help="tournament games (default: 1000, or every (dialogue, model pair) combination if fewer)")
    parser.add_argument("--limit", type=int, default=None, help="pairwise: judge only the first N shared ids")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for game sampling, single-order coin flips and the bootstrap (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.games is not None and args.games < 1:
        parser.error("--games must be >= 1")
    for name in ("concurrency", "max_tokens", "bootstrap"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("timeout", "backoff_base", "backoff_max"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.max_retries < 0:
        parser.error("--max-retries must be >= 0")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")


def run(args: argparse.Namespace, *, sleep: Callable[[float], None] = time.sleep) -> tuple[dict[str, Any], list[PairJudgment]]:
    """Load, judge, summarize and write the outputs; returns the results and the judgments."""
    from pdpo_jax.evaluate import report

    sets = [load_responses(p) for p in args.responses]
    if args.mode == "pairwise" and len(sets) != 2:
        raise JudgeConfigError(f"--mode pairwise takes exactly two responses files, got {len(sets)}")
    shared = common_ids(sets)
    if args.mode == "pairwise":
        ids = shared[: args.limit] if args.limit else shared
        items = [make_item(i, sets[0], sets[1]) for i in ids]
    else:
        by_model = {s.model: s for s in sets}
        combinations = len(shared) * len(sets) * (len(sets) - 1) // 2
        games = args.games if args.games is not None else min(DEFAULT_GAMES, combinations)
        items = [make_item(i, by_model[a], by_model[b]) for i, a, b in sample_games(shared, list(by_model), games, args.seed)]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = ClientSettings(
        model=args.judge_model,
        base_url=args.base_url,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout,
        api_key_env=args.api_key_env,
    )
    retry = RetryPolicy(max_retries=args.max_retries, backoff_base_s=args.backoff_base, backoff_max_s=args.backoff_max)
    cache = JudgmentCache(args.cache or out / "judge_cache.jsonl")
    completer = ChatCompleter(settings, retry, sleep=sleep)
    judge = PairJudge(completer.complete, cache, prompt_for(args.language), settings.model, settings.sampling())
    try:
        judgments = judge_pairs(items, judge, orders=args.orders, concurrency=args.concurrency, seed=args.seed)
    finally:
        completer.close()

    if args.mode == "pairwise":
        results = pairwise_summary(judgments, sets[0].model, sets[1].model, bootstrap=args.bootstrap, seed=args.seed)
        results["unmatched_ids"] = {s.model: len(s.records) - len(shared) for s in sets}
    else:
        results = tournament_summary(judgments, [s.model for s in sets], bootstrap=args.bootstrap, seed=args.seed)
        results["games_requested"] = len(items)
    results.update(
        {
            "judge": settings.public(),
            "language": args.language,
            "orders": args.orders,
            "seed": args.seed,
            "responses": [{"model": s.model, "path": s.path} for s in sets],
            "requests_sent": completer.requests_sent,
            "cache": {"path": str(cache.path), "torn_lines_dropped": cache.torn_lines_dropped},
        }
    )
    rows = []
    for n, j in enumerate(judgments):
        row = j.as_dict()
        if args.mode == "tournament":
            row["game"] = n
        rows.append(row)
    atomic_write_jsonl(out / "judgments.jsonl", rows)
    atomic_write_json(out / "judge_results.json", results)
    atomic_write_text(out / "judge_results.md", report.judge_markdown(results))
    if not args.no_plots:
        report.plot_win_rates(results, out / "win_rates.png")
        report.plot_outcomes(results, out / "outcomes.png")
    return results, judgments


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        results, _ = run(args)
    except JudgeConfigError as err:
        print(f"pdpo judge: {err}", file=sys.stderr)
        return 2
    from pdpo_jax.evaluate import report

    print(report.judge_markdown(results))
    failed = results["status"]["failed"]
    if failed:
        print(f"pdpo judge: {failed} judgments failed; rerun to retry them (finished ones are cached)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
