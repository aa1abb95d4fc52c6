"""The OpenAI wire format: request bodies checked into `Generation`s, results back into JSON.

Checking is plain dict work, no schema library. What goes wrong becomes an `ApiError` with the
status and the `{"error": {"message", "type", "param", "code"}}` body OpenAI's clients parse:

    400  the body is not JSON, or not an object; the prompt and max_tokens exceed the context
    401  a missing or wrong API key
    404  a model name this server does not serve; an unknown path
    422  a missing field, a value of the wrong type or out of its range, an unsupported option
    429  every slot is busy and the queue is full (with Retry-After)

Fields OpenAI defines that change nothing here (user, metadata, service_tier, ...) are accepted
and ignored; those that would change the output but are not implemented (penalties, logit_bias,
tools, echo, suffix, best_of) are refused when set to anything but their neutral value.
"""

from __future__ import annotations

import json
import math
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from pdpo_jax.serve.engine import TOP_LOGPROBS

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOP_STRINGS = 4
MAX_CHOICES = 16
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "tools": [], "functions": [],
           "echo": False, "suffix": None, "best_of": 1, "tool_choice": "none"}


class ApiError(Exception):
    """An error response: HTTP `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_value(param: str, message: str) -> ApiError:
    return ApiError(422, f"{param}: {message}", param=param, code="invalid_value")


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None  # None: what is left of the context
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    n: int
    logprobs: bool
    top_logprobs: int


@dataclass(frozen=True)
class Generation:
    """A checked request: the prompts (token ids, several for a batch of completions), how to sample."""

    endpoint: str  # "chat" or "completions"
    model: str
    prompts: tuple[tuple[int, ...], ...]
    sampling: Sampling
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict, key: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_value(key, f"expected a number, got {json.dumps(value)}")
    if value < low or value > high or (low_open and value == low):
        raise bad_value(key, f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return float(value)


def _integer(body: dict, key: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_value(key, f"expected an integer, got {json.dumps(value)}")
    if value < low or (high is not None and value > high):
        raise bad_value(key, f"must be {'>= ' + str(low) if high is None else f'in [{low}, {high}]'}, got {value}")
    return value


def _boolean(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_value(key, f"expected true or false, got {json.dumps(value)}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_value("stop", "expected a non-empty string or a list of them")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_value("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    return tuple(stops)


def _refuse_unsupported(body: dict) -> None:
    for key, neutral in NEUTRAL.items():
        if key in body and body[key] not in (None, neutral):
            raise ApiError(422, f"{key} is not supported by this server", param=key, code="unsupported_parameter")


def check_model(body: dict, served: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_value("model", "required: the name of the served model")
    if model != served:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served!r}", param="model",
                       code="model_not_found")
    return model


def _sampling(body: dict, *, chat: bool) -> Sampling:
    _refuse_unsupported(body)
    max_tokens = _integer(body, "max_completion_tokens", None, 1) if chat else None
    max_tokens = _integer(body, "max_tokens", max_tokens, 1)
    if max_tokens is None and not chat:
        max_tokens = DEFAULT_COMPLETION_TOKENS
    if chat:
        logprobs = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, 0, TOP_LOGPROBS)
        if top and not logprobs:
            raise bad_value("top_logprobs", "needs logprobs: true")
    else:
        top = _integer(body, "logprobs", None, 0, TOP_LOGPROBS)
        logprobs = top is not None
        top = top or 0
    seed = _integer(body, "seed", None, -(2**63), 2**64 - 1)
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=secrets.randbits(31) if seed is None else seed,
        stop=_stop(body),
        n=_integer(body, "n", 1, 1, MAX_CHOICES),
        logprobs=logprobs,
        top_logprobs=top,
    )


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise bad_value("stream_options", "expected an object")
    return stream, _boolean(options, "include_usage")


def message_text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad_value(where, "expected a string or a list of text parts")


def chat_messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_value("messages", "required: a non-empty list of {role, content}")
    checked = []
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_value(where, "expected an object with a role and a content")
        if message["role"] not in ("system", "developer", "user", "assistant"):
            raise bad_value(f"{where}.role", f"expected system, developer, user or assistant, got {message['role']!r}")
        role = "system" if message["role"] == "developer" else message["role"]
        checked.append({"role": role, "content": message_text(message.get("content"), f"{where}.content")})
    return checked


def completion_prompts(body: dict, encode: Callable[[str], list[int]]) -> list[tuple[int, ...]]:
    """`prompt`: a string, a list of strings, a list of token ids or a list of such lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [tuple(encode(prompt))]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [tuple(encode(p)) for p in prompt]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [tuple(prompt)]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in prompt):
            return [tuple(p) for p in prompt]
    raise bad_value("prompt", "required: a string, a list of strings, or token ids")


def parse_chat(body: dict, served: str, render: Callable[[list[dict[str, str]]], list[int]]) -> Generation:
    model = check_model(body, served)
    sampling = _sampling(body, chat=True)
    messages = chat_messages(body)
    stream, usage = _stream(body)
    return Generation("chat", model, (tuple(render(messages)),), sampling, stream, usage)


def parse_completion(body: dict, served: str, encode: Callable[[str], list[int]], vocab_size: int) -> Generation:
    model = check_model(body, served)
    sampling = _sampling(body, chat=False)
    prompts = completion_prompts(body, encode)
    for prompt in prompts:
        if any(not 0 <= t < vocab_size for t in prompt):
            raise bad_value("prompt", f"token ids must be in [0, {vocab_size})")
    stream, usage = _stream(body)
    return Generation("completions", model, tuple(prompts), sampling, stream, usage)


# ----------------------------------------------------------------------------- responses


@dataclass
class ChoiceResult:
    """What one choice produced: its text, finish reason, and per-token log-probabilities."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: list[Any] = field(default_factory=list)  # scheduler Tokens, when log-probabilities were asked for
    completion_tokens: int = 0


def object_name(generation: Generation, chunk: bool) -> str:
    if generation.endpoint == "chat":
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


def response_id(generation: Generation) -> str:
    return ("chatcmpl-" if generation.endpoint == "chat" else "cmpl-") + generation.id


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer: Any, tokens: list[Any]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in tokens]}


def completion_logprobs(tokenizer: Any, tokens: list[Any], offset: int = 0) -> dict[str, Any]:
    texts = [token_text(tokenizer, t.id) for t in tokens]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{token_text(tokenizer, i): lp for i, lp in t.top} for t in tokens],
            "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(generation: Generation, choices: list[ChoiceResult], tokenizer: Any) -> dict[str, Any]:
    prompt_tokens = sum(len(p) for p in generation.prompts)
    out = []
    for choice in choices:
        if generation.endpoint == "chat":
            logprobs = chat_logprobs(tokenizer, choice.tokens) if generation.sampling.logprobs else None
            out.append({"index": choice.index, "message": {"role": "assistant", "content": choice.text},
                        "logprobs": logprobs, "finish_reason": choice.finish_reason})
        else:
            logprobs = completion_logprobs(tokenizer, choice.tokens) if generation.sampling.logprobs else None
            out.append({"index": choice.index, "text": choice.text, "logprobs": logprobs,
                        "finish_reason": choice.finish_reason})
    return {"id": response_id(generation), "object": object_name(generation, chunk=False),
            "created": generation.created, "model": generation.model, "choices": out,
            "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices))}


def chunk(generation: Generation, index: int, text: str | None, finish_reason: str | None, *,
          tokens: list[Any] = (), tokenizer: Any = None, first: bool = False, offset: int = 0) -> dict[str, Any]:
    """One streamed piece of choice `index`: new text and/or its finish reason."""
    if generation.endpoint == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if generation.sampling.logprobs and tokens:
            choice["logprobs"] = chat_logprobs(tokenizer, list(tokens))
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if generation.sampling.logprobs and tokens:
            choice["logprobs"] = completion_logprobs(tokenizer, list(tokens), offset)
    return {"id": response_id(generation), "object": object_name(generation, chunk=True),
            "created": generation.created, "model": generation.model, "choices": [choice]}


def usage_chunk(generation: Generation, completion_tokens: int) -> dict[str, Any]:
    return {"id": response_id(generation), "object": object_name(generation, chunk=True),
            "created": generation.created, "model": generation.model, "choices": [],
            "usage": usage(sum(len(p) for p in generation.prompts), completion_tokens)}


def models_list(served: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": served, "object": "model", "created": created, "owned_by": "pdpo"}]}
