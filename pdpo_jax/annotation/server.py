"""The web application annotators vote in: Starlette on uvicorn over one study database.

Every URL lies under an annotator's personal link, `/a/<token>/`:

    GET  /a/<token>/                            the page (its script and style beside it)
    GET  /a/<token>/api/state                   name, the page's words, progress, where to resume
    GET  /a/<token>/api/items/<position>        the item at that position of this annotator's sequence
    POST /a/<token>/api/items/<position>/vote   {"choice": "1" | "2" | "draw"} -> stored, then progress
                                                and the next position to show

A missing or unknown token gets 403 and nothing else, whatever the path; a token opens only its
own annotator's items and votes. The page holds no data: its script fetches the items as JSON and
writes every text into the page as text, and the Content-Security-Policy allows no inline script,
so markup inside a response is shown, never run. A bad request gets a 4xx with a JSON
`{"error": ...}` (a body over MAX_BODY_BYTES a 413, whether its Content-Length says so or not); a
study database that went missing or unreadable a 503 until it is back, with one line in the log;
an unexpected error a 500 without details (the traceback goes to the server's log). No redirect
is built from the request's Host header: trailing slashes are not redirected, and the one redirect
(a link without its final slash) is relative. A client that hangs up mid-vote costs one line at INFO. Access logs are off: they would write every annotator's token into
the log.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import sqlite3
from importlib import resources
from typing import Any, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, Router

from pdpo_jax.annotation.errors import StudyError, StudyUnavailable
from pdpo_jax.annotation.page_text import labelled_history, page_text
from pdpo_jax.annotation.store import CHOICES, Annotator, Progress, ShownItem, Study
from pdpo_jax.listening import base_url, listening_socket

LOG = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 1024  # a vote is a few bytes
BACKLOG = 128
MAX_POSITION = 2**31  # larger numbers are no position (and would not fit an SQLite integer)
ANNOTATOR = "pdpo.annotator"  # where the gate leaves the annotator in the request scope
STATIC_MEDIA = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                 b"img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # the page's URL holds the token
    (b"cache-control", b"no-store"),
]


def _resource(name: str) -> bytes:
    return resources.files("pdpo_jax").joinpath("resources", "annotation", name).read_bytes()


async def _forbidden(scope: dict, receive: Callable, send: Callable) -> None:
    if scope["type"] == "http":
        await PlainTextResponse("forbidden", status_code=403)(scope, receive, send)
    elif scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})


class TokenGate:
    """Lets a request through to `app` only when its path's token belongs to an annotator."""

    def __init__(self, study: Study, app: Callable):
        self.study, self.app = study, app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        annotator = None
        if scope["type"] == "http":
            annotator = await run_in_threadpool(self.study.annotator_for_token, scope["path_params"]["token"])
        if annotator is None:
            await _forbidden(scope, receive, send)
            return
        await self.app({**scope, ANNOTATOR: annotator}, receive, send)


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response."""

    def __init__(self, app: Callable):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


class BodyLimit:
    """Answers 413 with a JSON error to a request whose body is larger than `max_bytes`: at once when
    its Content-Length says so, else as soon as more has arrived."""

    def __init__(self, app: Callable, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"the request body is larger than {self.max_bytes} bytes"
        length = Headers(scope=scope).get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_bytes:
            await JSONResponse({"error": too_large}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if received > self.max_bytes:
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited_receive, send)


def _annotator(request: Request) -> Annotator:
    return request.scope[ANNOTATOR]


def _position(request: Request) -> int:
    position = request.path_params["position"]
    if not 1 <= position <= MAX_POSITION:
        raise HTTPException(404, f"no item at position {position}; positions start at 1")
    return position


def _progress_json(progress: Progress) -> dict[str, Any]:
    return {"done": progress.done, "total": progress.total, "next": progress.next_open}


def _item_json(shown: ShownItem, language: str) -> dict[str, Any]:
    response_1, response_2 = shown.shown_responses
    return {"position": shown.position, "persona": list(shown.item.persona),
            "history": labelled_history(shown.item.history, language),
            "response_1": response_1, "response_2": response_2, "choice": shown.choice}


async def _read_choice(request: Request) -> str:
    # JSON only: a cross-site form cannot send it without a preflight this server never allows.
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "send the vote as JSON (Content-Type: application/json)")
    try:
        body = json.loads(await request.body())
    except ClientDisconnect:
        LOG.info("a client hung up before its vote arrived; nothing was stored")
        raise HTTPException(400, "the client disconnected before sending its vote") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise HTTPException(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict) or set(body) != {"choice"} or body["choice"] not in CHOICES:
        raise HTTPException(400, 'expected {"choice": "1" | "2" | "draw"}')
    return body["choice"]


def create_app(study: Study) -> Starlette:
    """The application over `study`; every request reads and writes the database afresh."""
    text = page_text(study.language)

    def static(name: str) -> Callable[[Request], Response]:
        content, media = _resource(name), STATIC_MEDIA[name.rsplit(".", 1)[-1]]
        return lambda request: Response(content, media_type=media)

    def state(request: Request) -> JSONResponse:
        annotator = _annotator(request)
        return JSONResponse({"annotator": annotator.name, "language": study.language, "text": text,
                             **_progress_json(study.progress(annotator))})

    def item(request: Request) -> JSONResponse:
        annotator, position = _annotator(request), _position(request)
        shown = study.shown_item(annotator, position)
        if shown is None:
            raise HTTPException(404, f"no item at position {position}")
        return JSONResponse({**_item_json(shown, study.language), **_progress_json(study.progress(annotator))})

    async def vote(request: Request) -> JSONResponse:
        annotator, position = _annotator(request), _position(request)
        choice = await _read_choice(request)
        voted = await run_in_threadpool(study.record_vote, annotator, position, choice)
        if voted is None:
            raise HTTPException(404, f"no item at position {position}")
        shown, progress = voted
        return JSONResponse({"position": shown.position, "choice": shown.choice, **_progress_json(progress)})

    def with_slash(request: Request) -> Response:
        if study.annotator_for_token(request.path_params["token"]) is None:
            return PlainTextResponse("forbidden", status_code=403)
        return RedirectResponse(f"{request.path_params['token']}/", status_code=307)  # relative: no Host trusted

    annotator_routes = BodyLimit(Router(redirect_slashes=False, routes=[
        Route("/", static("page.html")),
        Route("/page.js", static("page.js")),
        Route("/page.css", static("page.css")),
        Route("/api/state", state),
        Route("/api/items/{position:int}", item),
        Route("/api/items/{position:int}/vote", vote, methods=["POST"]),
    ]), MAX_BODY_BYTES)
    app = Starlette(
        routes=[Route("/a/{token}", with_slash), Mount("/a/{token}", app=TokenGate(study, annotator_routes)),
                Mount("", app=_forbidden)],
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={HTTPException: _http_error, StudyUnavailable: _study_unavailable,
                            sqlite3.DatabaseError: _study_unavailable, 500: _server_error},
    )
    app.router.redirect_slashes = False
    return app


async def _http_error(request: Request, error: HTTPException) -> Response:
    return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=error.headers)


async def _study_unavailable(request: Request, error: Exception) -> Response:
    what = str(error) if isinstance(error, StudyUnavailable) else f"the study database cannot be read ({error})"
    LOG.error("%s; answering 503 until it is back", what)
    return JSONResponse({"error": "the study is unavailable for now; try again later"}, status_code=503,
                        headers={"Retry-After": "30"})


async def _server_error(request: Request, error: Exception) -> Response:
    return JSONResponse({"error": "internal error; the server's log has the details"}, status_code=500)


def bind(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> socket.socket:
    """A listening socket on (host, port) for the study's server (`pdpo_jax.listening`)."""
    return listening_socket(host, port, BACKLOG, StudyError)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def make_server(study: Study) -> uvicorn.Server:
    """A uvicorn server of the study's application; `server.run(sockets=[bind(...)])` serves it
    until `server.should_exit` is set (or, in the main thread, until Ctrl-C)."""
    config = uvicorn.Config(create_app(study), lifespan="off", access_log=False, log_level="warning",
                            timeout_graceful_shutdown=3)
    return uvicorn.Server(config)


def serve(study: Study, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
          announce: Callable[[str], None] = print) -> None:
    """Serves the study until interrupted; `announce` is told the address once it is bound."""
    sock = bind(host, port)
    if not is_loopback(host):
        LOG.warning("serving on %s, beyond this machine: anyone who can reach it and holds a link can vote, "
                    "and nothing is encrypted; put an HTTPS proxy in front for a study over a network", host)
    announce(f"serving {study.path} at {base_url(sock)}/ (annotators open {base_url(sock)}/a/<token>/); Ctrl-C stops")
    make_server(study).run(sockets=[sock])
