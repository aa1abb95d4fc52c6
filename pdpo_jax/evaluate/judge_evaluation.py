"""The whole judge evaluation as one function of typed settings: load the responses files, judge
every pair (pairwise) or every drawn game (tournament), summarize, and write the outputs.

    results, judgments = run_judge(["sft.jsonl", "pdpo.jsonl"], "out/judge", JudgeSettings(model="gpt-4o"))

Outputs in the output folder, each written atomically: judge_results.json, judge_results.md,
judgments.jsonl (every answer) and, unless `plots=False`, win_rates.png and outcomes.png. Every
judge answer is also appended to the cache (`cache`, default OUT/judge_cache.jsonl), so a rerun
pays only for what is missing.

The API key is read from the environment variable that `api_key_env` names and handed to the
client only; nothing written to disk (cache, results, logs) contains it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from pdpo_jax.config import JudgeSection
from pdpo_jax.evaluate import report
from pdpo_jax.storage import atomic_write_json, atomic_write_jsonl, atomic_write_text
from pdpo_jax.evaluate.judge_pairs import (
    PairItem,
    PairJudge,
    PairJudgment,
    ResponseSet,
    common_ids,
    judge_pairs,
    load_responses,
    make_item,
)
from pdpo_jax.evaluate.judge_client import ChatCompleter, ClientSettings, JudgeConfigError, JudgmentCache, RetryPolicy
from pdpo_jax.evaluate.judge_prompts import PROMPTS, prompt_for
from pdpo_jax.object_store import as_path, is_object_store
from pdpo_jax.evaluate.judge_stats import DEFAULT_GAMES, pairwise_summary, sample_games, tournament_summary

__all__ = ["JudgeSettings", "run_judge", "settings_from_section"]

MODES = ("pairwise", "tournament")
ORDERS = ("both", "single")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class JudgeSettings:
    """Every option of a judge evaluation; the fields and defaults are those of the config's
    `judge` section (`pdpo_jax.config.JudgeSection`). Invalid values raise JudgeConfigError naming
    the field."""

    model: str  # the judge model's name at the endpoint
    base_url: str | None = None  # an OpenAI-compatible endpoint; None = the OpenAI API
    api_key_env: str = "OPENAI_API_KEY"
    language: str = "en"
    orders: Literal["both", "single"] = "both"
    temperature: float = 0.0
    max_tokens: int = 1024
    timeout: float = 60.0  # seconds per request
    concurrency: int = 8
    max_retries: int = 6
    backoff_base: float = 1.0  # seconds
    backoff_max: float = 60.0
    cache: str | os.PathLike | None = None  # None = judge_cache.jsonl in the output folder
    games: int | None = None  # tournament; None = DEFAULT_GAMES, or every combination if fewer
    limit: int | None = None  # pairwise: only the first N shared ids
    bootstrap: int = 1000
    seed: int = 0
    mode: Literal["pairwise", "tournament"] = "pairwise"
    plots: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise JudgeConfigError("model: no judge model given; set judge.model in the config or pass --judge-model")
        if self.base_url is not None and (not isinstance(self.base_url, str) or not self.base_url.strip()):
            raise JudgeConfigError(f"base_url must be a URL or None, got {self.base_url!r}")
        # Not echoed: a value that is no variable name may be the key itself, pasted in by mistake.
        if not isinstance(self.api_key_env, str) or not _ENV_NAME.fullmatch(self.api_key_env):
            raise JudgeConfigError(
                "api_key_env must be the name of an environment variable (letters, digits, underscores) "
                "that holds the API key, not the key itself"
            )
        for name, choices in (("language", tuple(sorted(PROMPTS))), ("orders", ORDERS), ("mode", MODES)):
            if getattr(self, name) not in choices:
                raise JudgeConfigError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name, least in (("max_tokens", 1), ("concurrency", 1), ("bootstrap", 1), ("max_retries", 0), ("seed", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < least:
                raise JudgeConfigError(f"{name} must be an integer >= {least}, got {value!r}")
        for name in ("games", "limit"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise JudgeConfigError(f"{name} must be an integer >= 1 or None, got {value!r}")
        for name in ("timeout", "backoff_base", "backoff_max"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise JudgeConfigError(f"{name} must be a number > 0, got {value!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise JudgeConfigError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.cache is not None and not isinstance(self.cache, (str, os.PathLike)):
            raise JudgeConfigError(f"cache must be a path or None, got {self.cache!r}")
        if not isinstance(self.plots, bool):
            raise JudgeConfigError(f"plots must be true or false, got {self.plots!r}")

    def client_settings(self) -> ClientSettings:
        return ClientSettings(
            model=self.model,
            base_url=self.base_url,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            timeout_s=self.timeout,
            api_key_env=self.api_key_env,
        )

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(max_retries=self.max_retries, backoff_base_s=self.backoff_base, backoff_max_s=self.backoff_max)


def settings_from_section(section: JudgeSection, **overrides: Any) -> JudgeSettings:
    """The config's `judge` section as settings, with `overrides` (e.g. command-line flags) replacing keys."""
    values = dataclasses.asdict(section)
    values.pop("serve", None)  # which model the stage serves, not how pairs are judged
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise JudgeConfigError(f"unknown judge setting {unknown[0]!r}; known: {', '.join(sorted(values))}")
    values.update(overrides)
    return JudgeSettings(**values)


def _pairwise_items(sets: Sequence[ResponseSet], shared: Sequence[str], settings: JudgeSettings) -> list[PairItem]:
    ids = shared[: settings.limit] if settings.limit else shared
    return [make_item(i, sets[0], sets[1]) for i in ids]


def _tournament_items(sets: Sequence[ResponseSet], shared: Sequence[str], settings: JudgeSettings) -> list[PairItem]:
    by_model = {s.model: s for s in sets}
    combinations = len(shared) * len(sets) * (len(sets) - 1) // 2
    games = settings.games if settings.games is not None else min(DEFAULT_GAMES, combinations)
    drawn = sample_games(shared, list(by_model), games, settings.seed)
    return [make_item(i, by_model[a], by_model[b]) for i, a, b in drawn]


def _judgment_rows(judgments: Sequence[PairJudgment], mode: str) -> list[dict[str, Any]]:
    rows = []
    for n, judgment in enumerate(judgments):
        row = judgment.as_dict()
        if mode == "tournament":
            row["game"] = n
        rows.append(row)
    return rows


def run_judge(
    responses: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    settings: JudgeSettings,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[dict[str, Any], list[PairJudgment]]:
    """Judge the responses files as `settings` say and write the outputs into `out_dir`.

    Pairwise: exactly two files, model A is the first. Tournament: two or more. Returns the results
    (as written to judge_results.json) and the judgments (as in judgments.jsonl). `sleep` waits
    between retries.
    """
    if not responses:
        raise JudgeConfigError("no responses files given")
    sets = [load_responses(p) for p in responses]
    if settings.mode == "pairwise" and len(sets) != 2:
        raise JudgeConfigError(f"mode 'pairwise' takes exactly two responses files, got {len(sets)}")
    shared = common_ids(sets)
    plan = _pairwise_items if settings.mode == "pairwise" else _tournament_items
    items = plan(sets, shared, settings)

    out = as_path(out_dir)
    if not is_object_store(out):  # a bucket has no folders to make
        out.mkdir(parents=True, exist_ok=True)
    client = settings.client_settings()
    cache = JudgmentCache(settings.cache or out / "judge_cache.jsonl")
    completer = ChatCompleter(client, settings.retry_policy(), sleep=sleep)
    judge = PairJudge(completer.complete, cache, prompt_for(settings.language), client.model, client.sampling())
    try:
        judgments = judge_pairs(items, judge, orders=settings.orders, concurrency=settings.concurrency, seed=settings.seed)
    finally:
        completer.close()
        cache.flush()

    if settings.mode == "pairwise":
        results = pairwise_summary(judgments, sets[0].model, sets[1].model, bootstrap=settings.bootstrap, seed=settings.seed)
        results["unmatched_ids"] = {s.model: len(s.records) - len(shared) for s in sets}
    else:
        results = tournament_summary(judgments, [s.model for s in sets], bootstrap=settings.bootstrap, seed=settings.seed)
        results["games_requested"] = len(items)
    results.update(
        {
            "judge": client.public(),
            "language": settings.language,
            "orders": settings.orders,
            "seed": settings.seed,
            "responses": [{"model": s.model, "path": s.path} for s in sets],
            "requests_sent": completer.requests_sent,
            "cache": {"path": str(cache.path), "torn_lines_dropped": cache.torn_lines_dropped},
        }
    )
    atomic_write_jsonl(out / "judgments.jsonl", _judgment_rows(judgments, settings.mode))
    atomic_write_json(out / "judge_results.json", results)
    atomic_write_text(out / "judge_results.md", report.judge_markdown(results))
    if settings.plots:
        report.plot_win_rates(results, out / "win_rates.png")
        report.plot_outcomes(results, out / "outcomes.png")
    return results, judgments
