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

With ``orders="single"`` each pair is judged once, in an order picked by a seeded coin flip so
that neither model sits in position 1 systematically.

Failures. An answer without a verdict is asked again once (the answer plus a reminder of the
format); if the second answer has none either, that order is "unparsable". A call that still fails
after the retries, or whose answer is no chat completion or holds no text, is "failed". A pair with
any failed order is failed, else with any unparsable order it is unparsable. Failed calls are not
cached, so a rerun asks for exactly those again.

Counting the outcomes is `judge_stats`; the whole evaluation from files to outputs is `judge_evaluation`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from pdpo_jax.evaluate.judge_client import JudgeCallFailed, JudgeConfigError, JudgmentCache, cache_key
from pdpo_jax.storage import jsonl_objects
from pdpo_jax.object_store import as_path, reported
from pdpo_jax.evaluate.judge_prompts import (
    JudgePrompt,
    Message,
    Outcome,
    build_messages,
    combine_orders,
    parse_verdict,
    reask_messages,
    verdict_to_outcome,
)


LOG = logging.getLogger(__name__)

__all__ = [
    "OrderJudgment", "PairItem", "PairJudge", "PairJudgment", "ResponseSet", "common_ids", "judge_pairs",
    "load_responses", "make_item", "presentation_orders",
]


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
    path = as_path(path)
    with reported(path):
        there = path.exists()
    if not there:
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
        if text.strip():  # an empty answer is a failure to ask again, not an answer to keep
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
