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

Win rate (tournament and pairwise): (wins + 0.5 * draws) / games, per model, with a percentile
bootstrap confidence interval that resamples games.

The API key is read from an environment variable and handed to the client only; nothing written
to disk (cache, results, logs) contains it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import logging
import os
import random
import re
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from pdpo_jax.evaluate.atomic import atomic_write_json, atomic_write_jsonl, atomic_write_text

LOG = logging.getLogger(__name__)

Outcome = Literal["win", "draw", "lose"]  # always from model A's side
Message = dict[str, str]
OUTCOMES: tuple[Outcome, ...] = ("win", "draw", "lose")
WIN_RATE_CONVENTION = "win rate = (wins + 0.5 * draws) / games; unparsable and failed games are excluded"


# --------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class JudgePrompt:
    """Everything language-specific about asking for one verdict."""

    system: str
    user_template: str  # fields: persona, history, response_1, response_2
    speaker_label: str  # the persona's owner, who says the judged response
    partner_label: str
    empty_history: str
    reask: str  # sent after an answer without a verdict


_SYSTEM_EN = """\
You are an impartial judge of persona-grounded open-domain dialogue. You are given the persona of \
a speaker (sentences describing who the speaker is), the dialogue so far, and two candidate \
responses that the speaker could say next. Decide which response better fulfils the persona and \
is preferable as the speaker's next turn.

Criteria, most important first:
1. Persona consistency: the response must not contradict any persona sentence. Naturally \
reflecting the persona where it fits is a plus; claiming facts that conflict with the persona is \
a serious fault, even if the response is otherwise fluent.
2. Response quality: coherent with the dialogue so far, relevant to the partner's last turn, \
fluent, natural and engaging as casual conversation.

Avoid these biases:
- Position: the order in which the two responses are shown must not influence your decision.
- Length: do not prefer a response because it is longer or shorter; judge what it says.
- Names: the labels "Response 1" and "Response 2" carry no meaning; ignore any names, and do not \
guess or consider which system wrote a response.

First write a brief explanation that compares the two responses on the criteria. Then end your \
answer with the verdict on its own line, in exactly this format: "[[1]]" if Response 1 is \
better, "[[2]]" if Response 2 is better, "[[3]]" if they are equally good or equally bad (a tie). \
The verdict must be the last thing you write."""

_USER_EN = """\
[Persona of the speaker]
{persona}

[Dialogue so far]
{history}

[Response 1]
{response_1}
[End of Response 1]

[Response 2]
{response_2}
[End of Response 2]

Which response better fulfils the persona and is preferable as the speaker's next turn? Explain \
first, then give your verdict as [[1]], [[2]] or [[3]] on the last line."""

_SYSTEM_JA = """\
あなたはペルソナに基づく雑談対話を評価する公平な審査員です。話者のペルソナ（話者がどんな人物かを説明する文）、\
ここまでの対話、そして話者が次に言いうる二つの応答候補が与えられます。どちらの応答がペルソナをよりよく満たし、\
話者の次の発話として望ましいかを判定してください。

評価基準（重要な順）:
1. ペルソナとの一貫性: 応答はどのペルソナ文とも矛盾してはいけません。自然な形でペルソナを反映していれば加点です。\
ペルソナと食い違う事実を述べることは、応答がほかの点で流暢であっても重大な欠点です。
2. 応答の質: ここまでの対話と整合し、相手の直前の発話に関連しており、流暢で自然な、雑談として魅力のある応答であること。

次の偏りを避けてください:
- 位置: 二つの応答が示される順番を判定に影響させないこと。
- 長さ: 長い・短いという理由で応答を選ばないこと。内容で判断すること。
- 名前: 「応答1」「応答2」というラベルに意味はありません。名前は無視し、どのシステムが書いた応答かを推測・考慮しないこと。

まず二つの応答を評価基準に沿って比較する短い説明を書いてください。そのあと最後の行に、判定を次の形式どおりに書いてください: \
応答1が良ければ「[[1]]」、応答2が良ければ「[[2]]」、同程度に良い、または同程度に悪ければ（引き分け）「[[3]]」。\
判定は必ず回答の最後に書いてください。"""

_USER_JA = """\
【話者のペルソナ】
{persona}

【ここまでの対話】
{history}

【応答1】
{response_1}
【応答1ここまで】

【応答2】
{response_2}
【応答2ここまで】

どちらの応答がペルソナをよりよく満たし、話者の次の発話として望ましいですか。まず説明を書き、最後の行に \
[[1]]、[[2]]、[[3]] のいずれかで判定を書いてください。"""

PROMPTS: dict[str, JudgePrompt] = {
    "en": JudgePrompt(
        system=_SYSTEM_EN,
        user_template=_USER_EN,
        speaker_label="Speaker",
        partner_label="Partner",
        empty_history="(no previous turns: the speaker opens the conversation)",
        reask="Your answer did not end with a verdict in the required format. Give your final "
        "verdict now, replying with exactly one of [[1]], [[2]] or [[3]].",
    ),
    "ja": JudgePrompt(
        system=_SYSTEM_JA,
        user_template=_USER_JA,
        speaker_label="話者",
        partner_label="相手",
        empty_history="（これまでの発話はありません。話者が会話を始めます）",
        reask="回答の最後に所定の形式の判定がありませんでした。最終判定を [[1]]、[[2]]、[[3]] の"
        "いずれか一つだけで答えてください。",
    ),
}


def prompt_for(language: str) -> JudgePrompt:
    if language not in PROMPTS:
        raise ValueError(f"unknown judge language {language!r}; choose one of {sorted(PROMPTS)}")
    return PROMPTS[language]


def format_history(history: Sequence[str], prompt: JudgePrompt) -> str:
    """Label turns counting back from the end: the last turn is the partner's, the speaker answers it."""
    if not history:
        return prompt.empty_history
    last = len(history) - 1
    labels = [prompt.partner_label if (last - i) % 2 == 0 else prompt.speaker_label for i in range(len(history))]
    return "\n".join(f"{label}: {turn}" for label, turn in zip(labels, history))


def build_messages(
    prompt: JudgePrompt, persona: Sequence[str], history: Sequence[str], response_1: str, response_2: str
) -> list[Message]:
    user = prompt.user_template.format(
        persona="\n".join(f"- {line}" for line in persona),
        history=format_history(history, prompt),
        response_1=response_1,
        response_2=response_2,
    )
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": user}]


def reask_messages(prompt: JudgePrompt, messages: Sequence[Message], answer: str) -> list[Message]:
    return [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": prompt.reask}]


# --------------------------------------------------------------------------------------------
# Verdicts and how two orders combine

_VERDICT = re.compile(r"\[\[\s*([123])\s*\]\]")


def parse_verdict(text: str) -> int | None:
    """The last [[1]]/[[2]]/[[3]] in the text; NFKC first so full-width brackets and digits count."""
    found = _VERDICT.findall(unicodedata.normalize("NFKC", text or ""))
    return int(found[-1]) if found else None


def verdict_to_outcome(verdict: int, a_first: bool) -> Outcome:
    if verdict == 3:
        return "draw"
    return "win" if (verdict == 1) == a_first else "lose"


def combine_orders(first: Outcome, second: Outcome) -> Outcome:
    """Agreement keeps the outcome; a decision plus a tie keeps the decision; win vs lose is a draw."""
    if first == second:
        return first
    if first == "draw":
        return second
    if second == "draw":
        return first
    return "draw"


# --------------------------------------------------------------------------------------------
# Cache


def cache_key(model: str, messages: Sequence[Message], sampling: Mapping[str, Any]) -> str:
    payload = json.dumps(
        {"model": model, "messages": list(messages), "sampling": dict(sampling)},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgmentCache:
    """Append-only jsonl of judge answers keyed by `cache_key`; every record is fsynced.

    A crash can tear only the last line; loading drops such a line and cuts it off the file so the
    next append starts on a clean line. Damage anywhere else is reported, not guessed around.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.torn_lines_dropped = 0
        self._answers = self._load()

    def _load(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        answers: dict[str, str] = {}
        for number, raw in enumerate(complete, start=1):
            if raw.strip():
                key, text = self._parse_line(raw, number)
                answers[key] = text
        if tail.strip():
            try:
                key, text = self._parse_line(tail, len(complete) + 1)
            except ValueError:
                self.torn_lines_dropped = 1
                LOG.warning("%s: dropping a torn last line (%d bytes) left by an interrupted write", self.path, len(tail))
                with open(self.path, "r+b") as handle:
                    handle.truncate(len(data) - len(tail))
                    handle.flush()
                    os.fsync(handle.fileno())
            else:
                answers[key] = text
                with open(self.path, "ab") as handle:
                    handle.write(b"\n")
                    handle.flush()
                    os.fsync(handle.fileno())
        return answers

    def _parse_line(self, raw: bytes, number: int) -> tuple[str, str]:
        try:
            record = json.loads(raw)
            return str(record["key"]), str(record["text"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.path}:{number}: not a cache record ({err})") from None

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._answers.get(key)

    def put(self, key: str, text: str, model: str) -> None:
        line = json.dumps({"key": key, "model": model, "text": text, "time": time.time()}, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as handle:
                handle.write(line.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            self._answers[key] = text


# --------------------------------------------------------------------------------------------
# The client: bounded retries with exponential backoff and jitter


class JudgeConfigError(ValueError):
    """The judge cannot start: missing key, bad input files, bad options."""


class JudgeCallFailed(RuntimeError):
    """A chat completion that still failed after the allowed retries (or could not be retried)."""


@dataclass(frozen=True)
class ClientSettings:
    model: str
    base_url: str | None = None
    temperature: float = 0.0
    max_tokens: int = 1024
    timeout_s: float = 60.0
    api_key_env: str = "OPENAI_API_KEY"

    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    def public(self) -> dict[str, Any]:
        """What may be written to results: the name of the key's variable, never its value."""
        return {
            "model": self.model,
            "base_url": self.base_url,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "timeout_s": self.timeout_s,
            "api_key_env": self.api_key_env,
        }


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0

    def delay_s(self, attempt: int, retry_after_s: float | None, rng: random.Random) -> float:
        """Half fixed, half random ("equal jitter") exponential backoff; a server's Retry-After wins if longer."""
        backoff = min(self.backoff_max_s, self.backoff_base_s * 2.0**attempt)
        delay = backoff / 2 + rng.uniform(0.0, backoff / 2)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.backoff_max_s))
        return delay


_RETRYABLE_STATUS = {408, 409, 429}


def _is_retryable(err: Exception) -> bool:
    import openai

    if isinstance(err, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    if isinstance(err, openai.APIStatusError):
        return err.status_code in _RETRYABLE_STATUS or err.status_code >= 500
    return False


def _retry_after_s(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue  # an HTTP date; the exponential backoff covers it
    return None


class ChatCompleter:
    """One OpenAI-compatible chat endpoint; `complete(messages)` returns the answer text.

    The openai client's own retries are switched off (max_retries=0) so they do not multiply ours.
    """

    def __init__(
        self,
        settings: ClientSettings,
        retry: RetryPolicy = RetryPolicy(),
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        import openai

        key = os.environ.get(settings.api_key_env)
        if not key:
            raise JudgeConfigError(
                f"environment variable {settings.api_key_env} is not set; put the judge API key there "
                f"(for a local server without authentication any value works, e.g. EMPTY)"
            )
        self.settings = settings
        self.retry = retry
        self._secret = key
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._client = openai.OpenAI(
            api_key=key, base_url=settings.base_url, timeout=settings.timeout_s, max_retries=0
        )
        self._count_lock = threading.Lock()
        self.requests_sent = 0

    def close(self) -> None:
        self._client.close()

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***")

    def complete(self, messages: Sequence[Message]) -> str:
        attempts = self.retry.max_retries + 1
        for attempt in range(attempts):
            with self._count_lock:
                self.requests_sent += 1
            try:
                response = self._client.chat.completions.create(
                    model=self.settings.model, messages=list(messages), **self.settings.sampling()
                )
            except Exception as err:  # noqa: BLE001 - classified just below, re-raised if unknown
                import openai

                if not isinstance(err, openai.APIError):
                    raise
                status = getattr(err, "status_code", None)
                what = self._redact(f"{type(err).__name__}" + (f" (HTTP {status})" if status else "") + f": {err}")
                if not _is_retryable(err):
                    raise JudgeCallFailed(f"not retryable: {what}") from None
                if attempt + 1 == attempts:
                    raise JudgeCallFailed(f"gave up after {attempts} attempts: {what}") from None
                delay = self.retry.delay_s(attempt, _retry_after_s(err), self._rng)
                LOG.info("judge call failed (%s); retry %d/%d in %.2fs", what, attempt + 1, self.retry.max_retries, delay)
                self._sleep(delay)
                continue
            if not response.choices:
                return ""
            return response.choices[0].message.content or ""
        raise AssertionError("unreachable")


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
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise JudgeConfigError(f"{where}: not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise JudgeConfigError(f"{where}: expected a JSON object")
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
# Summaries


def bootstrap_win_rates(
    scores: np.ndarray, played: np.ndarray, *, samples: int, seed: int, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap over games of each model's win rate.

    scores[g, m] is model m's score in game g (1 win, 0.5 draw, 0 loss), played[g, m] is 1 where m
    took part. Returns (low, high) per model; NaN where a model never played.
    """
    n_games = scores.shape[0]
    if n_games == 0 or samples < 1:
        nan = np.full(scores.shape[1], np.nan)
        return nan, nan.copy()
    rng = np.random.default_rng([seed, 2])
    # Each bootstrap sample as multiplicity weights over games: the same as resampling indices.
    weights = rng.multinomial(n_games, np.full(n_games, 1.0 / n_games), size=samples).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = (weights @ scores) / (weights @ played)
    tail = (1.0 - confidence) / 2 * 100
    low = np.full(scores.shape[1], np.nan)
    high = np.full(scores.shape[1], np.nan)
    for m in range(scores.shape[1]):
        column = rates[:, m][~np.isnan(rates[:, m])]
        if column.size:
            low[m], high[m] = np.percentile(column, [tail, 100 - tail])
    return low, high


def _none_if_nan(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def _status_counts(judgments: Sequence[PairJudgment]) -> dict[str, int]:
    return {
        "requested": len(judgments),
        "judged": sum(j.status == "ok" for j in judgments),
        "unparsable": sum(j.status == "unparsable" for j in judgments),
        "failed": sum(j.status == "failed" for j in judgments),
        "reasked_orders": sum(len(o.texts) > 1 for j in judgments for o in j.orders),
    }


def position_consistency(judgments: Sequence[PairJudgment]) -> dict[str, Any]:
    """How often the two orders agree exactly, and how often position 1 wins a decided single verdict."""
    both = [j for j in judgments if j.consistent is not None]
    singles = [o for j in judgments for o in j.orders if o.status == "ok"]
    decided = [o for o in singles if o.verdict in (1, 2)]
    first_wins = sum(o.verdict == 1 for o in decided)
    consistent = sum(bool(j.consistent) for j in both)
    return {
        "pairs": len(both),
        "consistent": consistent,
        "rate": consistent / len(both) if both else None,
        "first_position_win_rate": first_wins / len(decided) if decided else None,
        "decided_single_verdicts": len(decided),
    }


def _counts(outcomes: Sequence[Outcome]) -> dict[str, int]:
    return {k: sum(o == k for o in outcomes) for k in OUTCOMES}


def _percentages(counts: Mapping[str, int]) -> dict[str, float | None]:
    total = sum(counts.values())
    return {k: (100.0 * v / total if total else None) for k, v in counts.items()}


def pairwise_summary(
    judgments: Sequence[PairJudgment], model_a: str, model_b: str, *, bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Win/draw/lose of model A against model B (the paper's Table 3 layout) plus A's win rate with a CI."""
    outcomes = [j.outcome for j in judgments if j.outcome is not None]
    counts = _counts(outcomes)
    score_a = np.array([{"win": 1.0, "draw": 0.5, "lose": 0.0}[o] for o in outcomes])
    scores = np.stack([score_a, 1.0 - score_a], axis=1) if outcomes else np.zeros((0, 2))
    low, high = bootstrap_win_rates(scores, np.ones_like(scores), samples=bootstrap, seed=seed)
    rate = float(score_a.mean()) if outcomes else None
    return {
        "mode": "pairwise",
        "model_a": model_a,
        "model_b": model_b,
        "counts": counts,
        "percentages": _percentages(counts),
        "status": _status_counts(judgments),
        "position_consistency": position_consistency(judgments),
        "win_rate_a": {"value": rate, "ci_low": _none_if_nan(low[0]), "ci_high": _none_if_nan(high[0])},
        "win_rate_convention": WIN_RATE_CONVENTION,
    }


def sample_games(ids: Sequence[str], models: Sequence[str], games: int, seed: int) -> list[tuple[str, str, str]]:
    """`games` distinct (id, model A, model B) draws: a dialogue and two distinct models, seeded.

    Distinct (dialogue, unordered model pair) combinations, so no game is a copy of another; which
    model is A is a seeded coin flip.
    """
    if len(models) < 2:
        raise JudgeConfigError(f"a tournament needs at least two models, got {list(models)}")
    pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1 :]]
    total = len(ids) * len(pairs)
    if not 1 <= games <= total:
        raise JudgeConfigError(
            f"--games must be between 1 and {total} ({len(ids)} shared dialogues x {len(pairs)} model pairs), got {games}"
        )
    rng = np.random.default_rng([seed, 3])
    picks = rng.choice(total, size=games, replace=False)
    swaps = rng.integers(0, 2, size=games)
    drawn = []
    for pick, swap in zip(picks, swaps):
        id_index, pair_index = divmod(int(pick), len(pairs))
        a, b = pairs[pair_index]
        drawn.append((ids[id_index], *((b, a) if swap else (a, b))))
    return drawn


def tournament_summary(
    judgments: Sequence[PairJudgment],
    models: Sequence[str],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Each model's win rate over the games it played, with bootstrap CIs, and the head-to-head table."""
    index = {m: i for i, m in enumerate(models)}
    decided = [j for j in judgments if j.outcome is not None]
    scores = np.zeros((len(decided), len(models)))
    played = np.zeros_like(scores)
    head_to_head = {a: {b: dict.fromkeys(OUTCOMES, 0) for b in models if b != a} for a in models}
    flip = {"win": "lose", "draw": "draw", "lose": "win"}
    for g, j in enumerate(decided):
        a, b, outcome = j.item.model_a, j.item.model_b, j.outcome
        score = {"win": 1.0, "draw": 0.5, "lose": 0.0}[outcome]
        scores[g, index[a]], scores[g, index[b]] = score, 1.0 - score
        played[g, index[a]] = played[g, index[b]] = 1.0
        head_to_head[a][b][outcome] += 1
        head_to_head[b][a][flip[outcome]] += 1
    low, high = bootstrap_win_rates(scores, played, samples=bootstrap, seed=seed, confidence=confidence)
    rows = []
    for m, model in enumerate(models):
        record = {k: sum(head_to_head[model][o][k] for o in head_to_head[model]) for k in OUTCOMES}
        games = int(played[:, m].sum())
        rows.append(
            {
                "model": model,
                "games": games,
                "wins": record["win"],
                "draws": record["draw"],
                "losses": record["lose"],
                "win_rate": float(scores[:, m].sum() / games) if games else None,
                "ci_low": _none_if_nan(low[m]),
                "ci_high": _none_if_nan(high[m]),
            }
        )
    return {
        "mode": "tournament",
        "models": rows,
        "head_to_head": head_to_head,
        "status": _status_counts(judgments),
        "position_consistency": position_consistency(judgments),
        "confidence": confidence,
        "bootstrap_samples": bootstrap,
        "win_rate_convention": WIN_RATE_CONVENTION,
    }


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdpo judge",
        description="Pairwise LLM-as-judge evaluation of persona dialogue responses against an "
        "OpenAI-compatible chat endpoint. The judge explains, then ends with [[1]], [[2]] or [[3]] (tie).",
        epilog="Responses files are jsonl, one object per line: "
        '{"id": ..., "persona": [...], "history": [...], "response": "...", "model": "name"} '
        '(without "model" the file name is used). Files are matched by id. '
        "pairwise: win/draw/lose of the first file's model against the second's. "
        "tournament: --games random (dialogue, two distinct models) draws; each model's win rate "
        "(wins + 0.5 draws) / games with bootstrap 95%% CIs and a head-to-head table. "
        "Outputs in --out: judge_results.json, judge_results.md, judgments.jsonl, and PNG plots. "
        "Every judge answer is cached (--cache), so a rerun pays only for what is missing; "
        "exit status 1 means some calls failed and a rerun will retry them.",
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
    parser.add_argument("--games", type=int, default=1000, help="tournament games (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="pairwise: judge only the first N shared ids")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for game sampling, single-order coin flips and the bootstrap (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def _check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("concurrency", "max_tokens", "bootstrap"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("timeout", "backoff_base", "backoff_max"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.max_retries < 0:
        parser.error("--max-retries must be >= 0")


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
        items = [make_item(i, by_model[a], by_model[b]) for i, a, b in sample_games(shared, list(by_model), args.games, args.seed)]

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
        results["games_requested"] = args.games
    results.update(
        {
            "judge": settings.public(),
            "language": args.language,
            "orders": args.orders,
            "seed": args.seed,
            "responses": [{"model": s.model, "path": s.path} for s in sets],
            "requests_sent": completer.requests_sent,
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
    _check_positive(parser, args)
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
