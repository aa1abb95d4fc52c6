"""Talking to an OpenAI-compatible chat endpoint: bounded retries with backoff, and an on-disk answer cache.

The API key is read from an environment variable and handed to the openai client only; it is
never written to the cache, results or error messages: an answer or error that quotes it (an
endpoint may echo the request's Authorization header) has it replaced by `***` before anyone sees it.

A call ends in answer text or in JudgeCallFailed, whatever the endpoint sends: an HTTP 200 that is
not a chat completion (HTML, plain text, JSON of another shape, no choices, no text) fails that
call like a refused request does, so it is never cached and a rerun asks again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from pdpo_jax.errors import PdpoError
from pdpo_jax.evaluate.judge_prompts import Message
from pdpo_jax.object_store import as_path, is_object_store
from pdpo_jax.storage import atomic_write_bytes, read_bytes_if_exists

LOG = logging.getLogger(__name__)


class JudgeConfigError(PdpoError):
    """The judge cannot start: missing key, bad input files or options, a damaged cache."""


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

    # On gs:// an object cannot be appended to: the cache is uploaded whole, at most this often
    # while answers come in and once more at `flush()`, so a crash loses at most these seconds' answers.
    UPLOAD_EVERY_S = 30.0

    def __init__(self, path: str | os.PathLike):
        self.path = as_path(path)
        self._on_object_store = is_object_store(path)
        self._lock = threading.Lock()
        self.torn_lines_dropped = 0
        self._uploaded_at = time.monotonic()
        self._unsaved = False
        self._answers = self._load_object() if self._on_object_store else self._load()

    def _load_object(self) -> dict[str, str]:
        """The answers of a gs:// cache, whose text is kept here to be uploaded whole with new ones."""
        data = read_bytes_if_exists(self.path) or b""
        answers = {}
        for number, raw in enumerate(data.split(b"\n"), start=1):
            if raw.strip():
                key, text = self._parse_line(raw, number)
                answers[key] = text
        self._text = bytearray(data if not data or data.endswith(b"\n") else data + b"\n")
        return answers

    def flush(self) -> None:
        """Uploads the answers not yet on gs:// (a local cache is always up to date)."""
        with self._lock:
            if self._on_object_store and self._unsaved:
                atomic_write_bytes(self.path, bytes(self._text))
                self._unsaved = False
                self._uploaded_at = time.monotonic()

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
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            raise JudgeConfigError(f"{self.path}:{number}: not a cache record ({str(err)[:100]})") from None

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._answers.get(key) or None  # an empty answer (older caches kept some) is no answer

    def put(self, key: str, text: str, model: str) -> None:
        line = json.dumps({"key": key, "model": model, "text": text, "time": time.time()}, ensure_ascii=False) + "\n"
        if self._on_object_store:
            with self._lock:
                self._text += line.encode("utf-8")
                self._answers[key] = text
                self._unsaved = True
                due = time.monotonic() - self._uploaded_at >= self.UPLOAD_EVERY_S
            if due:
                self.flush()
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as handle:
                handle.write(line.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            self._answers[key] = text


# --------------------------------------------------------------------------------------------
# The client: bounded retries with exponential backoff and jitter


class JudgeCallFailed(RuntimeError):
    """A chat completion that still failed after the allowed retries (or could not be retried), or
    an answer that holds no text."""


# What the openai client raises on a 200 answer it cannot parse: JSONDecodeError, UnicodeDecodeError
# (an answer of any other shape it returns as it is, and `_answer_text` looks at it)
_UNREADABLE_ANSWER = (ValueError,)
MAX_ERROR_CHARS = 300  # of an endpoint's words quoted in an error


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

    def _failure(self, what: str) -> JudgeCallFailed:
        text = self._redact(" ".join(what.split()))
        return JudgeCallFailed(text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "...")

    def _answer_text(self, response: Any) -> str:
        """The first choice's text, the key redacted; JudgeCallFailed when the answer holds none."""
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list):
            shown = response if isinstance(response, str) else type(response).__name__
            raise self._failure(f"the endpoint's HTTP 200 answer is not a chat completion: {str(shown)[:100]!r}")
        if not choices:
            raise self._failure("the endpoint answered with no choices")
        content = getattr(getattr(choices[0], "message", None), "content", None)
        if not isinstance(content, str):
            raise self._failure(f"the endpoint's answer has no text (message content {type(content).__name__})")
        if not content.strip():
            raise self._failure("the endpoint's answer is empty")
        return self._redact(content)

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

                if isinstance(err, _UNREADABLE_ANSWER):
                    raise self._failure(f"the endpoint's answer cannot be read: {type(err).__name__}: {err}") from None
                if not isinstance(err, openai.APIError):
                    raise
                status = getattr(err, "status_code", None)
                what = self._redact(f"{type(err).__name__}" + (f" (HTTP {status})" if status else "") + f": {err}")
                if not _is_retryable(err):
                    raise self._failure(f"not retryable: {what}") from None
                if attempt + 1 == attempts:
                    raise self._failure(f"gave up after {attempts} attempts: {what}") from None
                delay = self.retry.delay_s(attempt, _retry_after_s(err), self._rng)
                LOG.info("judge call failed (%s); retry %d/%d in %.2fs", what, attempt + 1, self.retry.max_retries, delay)
                self._sleep(delay)
                continue
            return self._answer_text(response)
        raise AssertionError("unreachable")
