"""The HTTP application: OpenAI's endpoints on Starlette, over one scheduler.

    GET  /health                 {"status": "ok" or "draining", slots, busy, waiting, compiled shapes}
    GET  /v1/models              the one served model
    POST /v1/chat/completions    messages -> the model's chat template -> a reply; `stream: true` as
                                 server-sent events ending with `data: [DONE]`
    POST /v1/completions         prompt (text or token ids) -> its continuation, with `logprobs`

Every request becomes one scheduler job per choice (`n` per prompt). A client that disconnects
cancels its jobs, so their slots are free for the next step. With an API key, /v1/* needs
`Authorization: Bearer <key>` (compared in constant time); /health never does.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pdpo_jax.serve import protocol
from pdpo_jax.serve.engine import PromptTooLong, SlotRequest
from pdpo_jax.serve.protocol import ApiError, ChoiceResult, Generation
from pdpo_jax.serve.scheduler import Job, QueueFull, Scheduler, ShuttingDown, Token, describe
from pdpo_jax.serve.text import TextStream

LOG = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 2**20
RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.5


@dataclass
class Service:
    """What the endpoints serve: the scheduler, the tokenizer, the name clients ask for, the key."""

    scheduler: Scheduler
    tokenizer: Any
    served_name: str
    render_chat: Callable[[list[dict[str, str]]], list[int]]
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def engine(self):
        return self.scheduler.engine

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- running a request


class Choices:
    """The jobs of one request and the events they send back to the event loop."""

    def __init__(self, service: Service, generation: Generation):
        self.service, self.generation = service, generation
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.jobs: list[Job] = []
        self.streams: list[TextStream] = []
        sampling = generation.sampling
        for prompt in generation.prompts:
            budget = sampling.max_tokens or service.engine.max_model_len - len(prompt)
            try:
                service.engine.check_fits(len(prompt), max(budget, 1))
            except PromptTooLong as err:
                raise ApiError(400, f"{err}; shorten the prompt or lower max_tokens", param="messages"
                               if generation.endpoint == "chat" else "prompt", code="context_length_exceeded") from None
            for copy in range(sampling.n):
                index = len(self.jobs)
                stream = TextStream(service.tokenizer, sampling.stop)
                request = SlotRequest(prompt, temperature=sampling.temperature, top_p=sampling.top_p,
                                      seed=(sampling.seed + copy) % 2**32,
                                      top_logprobs=sampling.top_logprobs if sampling.logprobs else 0)
                self.streams.append(stream)
                self.jobs.append(Job(request, budget, self._on_token(index, stream), self._on_finish(index)))

    def _send(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def _on_token(self, index: int, stream: TextStream) -> Callable[[Token], bool]:
        def on_token(token: Token) -> bool:
            done = stream.add(token.id)
            self._send(("token", index, token))
            return done

        return on_token

    def _on_finish(self, index: int) -> Callable[[str], None]:
        return lambda reason: self._send(("finish", index, reason))

    def submit(self) -> None:
        try:
            for job in self.jobs:
                self.service.scheduler.submit(job)
        except QueueFull as err:
            self.cancel()
            raise ApiError(429, f"the server is busy: {err}; retry after {RETRY_AFTER_SECONDS} s",
                           kind="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except ShuttingDown as err:
            self.cancel()
            raise ApiError(503, str(err), kind="server_error", code="shutting_down") from None

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()


def failure(reason: str) -> ApiError:
    if reason == "cancelled":
        return ApiError(503, "the request was cancelled: the server is shutting down", kind="server_error",
                        code="shutting_down")
    return ApiError(500, "internal error while generating; the server's log has the details", kind="server_error")


async def complete(choices: Choices, request: Request) -> dict[str, Any] | None:
    """Waits for every choice to finish: the response; None (the jobs cancelled) if the client went away."""
    results = [ChoiceResult(index) for index in range(len(choices.jobs))]
    unfinished = len(results)
    try:
        while unfinished:
            try:
                kind, index, payload = await asyncio.wait_for(choices.events.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            if kind == "token":
                results[index].completion_tokens += 1
                if choices.generation.sampling.logprobs:
                    results[index].tokens.append(payload)
                continue
            if payload in ("cancelled", "error"):
                raise failure(payload)
            results[index].finish_reason = payload
            results[index].text = choices.streams[index].ready(final=True)
            unfinished -= 1
    finally:
        choices.cancel()  # a no-op for finished jobs
    return protocol.full_response(choices.generation, results, choices.service.tokenizer)


def sse(payload: dict[str, Any] | str) -> bytes:
    return b"data: " + (payload if isinstance(payload, str) else json.dumps(payload)).encode() + b"\n\n"


async def stream_events(choices: Choices) -> AsyncIterator[bytes]:
    """Server-sent events: a chunk per piece of text that is ready, the finish reasons, usage, [DONE].
    Cancelled with the response when the client disconnects; the jobs are cancelled then."""
    generation, tokenizer = choices.generation, choices.service.tokenizer
    unfinished = set(range(len(choices.jobs)))
    counts = [0] * len(choices.jobs)
    pending: list[list[Token]] = [[] for _ in choices.jobs]
    offsets = [0] * len(choices.jobs)
    try:
        if generation.endpoint == "chat":
            for index in unfinished:
                yield sse(protocol.chunk(generation, index, "", None, first=True))
        while unfinished:
            kind, index, payload = await choices.events.get()
            stream = choices.streams[index]
            if kind == "token":
                counts[index] += 1
                if generation.sampling.logprobs:
                    pending[index].append(payload)
                text = stream.ready()
                if text:
                    yield sse(protocol.chunk(generation, index, text, None, tokens=pending[index],
                                             tokenizer=tokenizer, offset=offsets[index]))
                    offsets[index] += len(text)
                    pending[index] = []
                continue
            unfinished.discard(index)
            if payload in ("cancelled", "error"):
                yield sse(failure(payload).body())
                return
            yield sse(protocol.chunk(generation, index, stream.ready(final=True), payload, tokens=pending[index],
                                     tokenizer=tokenizer, offset=offsets[index]))
        if generation.include_usage:
            yield sse(protocol.usage_chunk(generation, sum(counts)))
        yield sse("[DONE]")
    finally:
        choices.cancel()


# ----------------------------------------------------------------------------- the application


def create_app(service: Service) -> Starlette:
    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", code="body_too_large")
        return protocol.parse_body(raw)

    def check_key(request: Request) -> None:
        if service.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {service.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", kind="authentication_error",
                           code="invalid_api_key")

    async def generate(request: Request, generation: Generation) -> Response:
        choices = Choices(service, generation)
        choices.submit()
        if generation.stream:
            return StreamingResponse(stream_events(choices), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store"})
        response = await complete(choices, request)
        if response is None:  # nobody is listening; 499 only shows in a log
            return Response(status_code=499)
        return JSONResponse(response)

    async def chat_completions(request: Request) -> Response:
        check_key(request)
        body = await body_of(request)
        return await generate(request, protocol.parse_chat(body, service.served_name, service.render_chat))

    async def completions(request: Request) -> Response:
        check_key(request)
        body = await body_of(request)
        return await generate(request, protocol.parse_completion(body, service.served_name, service.encode,
                                                                 service.engine.config.vocab_size))

    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse(protocol.models_list(service.served_name, service.created))

    async def health(request: Request) -> Response:
        return JSONResponse({"model": service.served_name, **describe(service.scheduler)})

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, 500: _server_error},
    )


async def _api_error(request: Request, error: ApiError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _http_error(request: Request, error: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    return JSONResponse(ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                 code=code).body(), status_code=error.status_code)


async def _server_error(request: Request, error: Exception) -> Response:
    LOG.error("error serving %s", request.url.path, exc_info=error)
    return JSONResponse(failure("error").body(), status_code=500)
