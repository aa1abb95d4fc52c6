"""A chat endpoint on 127.0.0.1 that answers exactly the bytes a test scripts, for what a careless
or hostile OpenAI-compatible server may send: any status, headers and body, including an echo of
the request (its Authorization header among them).

`answer(request)` gets the request (`RawRequest`: path, headers, body bytes) and returns a
`RawAnswer`. Every request is recorded.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass(frozen=True)
class RawRequest:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def authorization(self) -> str:
        return next((value for name, value in self.headers.items() if name.lower() == "authorization"), "")


@dataclass(frozen=True)
class RawAnswer:
    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)


def completion(content: object, **extra: object) -> bytes:
    """A chat completion JSON body whose first choice's message content is `content`."""
    return json.dumps({"id": "x", "object": "chat.completion", "model": "m", **extra,
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}]}).encode()


@dataclass
class RawEndpoint:
    answer: Callable[[RawRequest], RawAnswer]
    requests: list[RawRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = RawRequest(self.path, dict(self.headers.items()), body)
                endpoint.requests.append(request)
                answer = endpoint.answer(request)
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers:
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                # A client that hangs up (a 204 with a body makes ours drop the connection) is the
                # client's business; the server's traceback on stderr would read as ours.
                pass

        self._httpd = QuietServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        # polled every 10 ms: shutdown() waits up to one poll interval (0.5 s by default) at every stop
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> "RawEndpoint":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
