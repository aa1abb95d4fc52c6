"""A scripted OpenAI-compatible chat server on 127.0.0.1 for judge tests.

`policy(request_body, attempt)` decides each reply; `attempt` counts earlier requests with the same
messages (0 for the first), so "fail twice, then answer" is easy to script. The server records every
request (body and Authorization header) and the largest number of requests it held at once.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Reply:
    status: int = 200
    text: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


Policy = Callable[[dict[str, Any], int], Reply]


def completion_json(text: str, model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class ScriptedJudgeServer:
    def __init__(self, policy: Policy, *, hold_until_in_flight: int | None = None, hold_timeout_s: float = 3.0):
        self.policy = policy
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        # Holding requests until `hold_until_in_flight` are open at once proves the client really
        # overlaps them, without any timing assumption; the timeout only guards against a hang.
        self._hold = hold_until_in_flight
        self._hold_timeout_s = hold_timeout_s
        self._reached = threading.Event()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        # polled every 10 ms: shutdown() waits up to one poll interval (0.5 s by default) at every stop
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> "ScriptedJudgeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def _begin(self, body: dict[str, Any], authorization: str) -> int:
        key = json.dumps(body.get("messages"), sort_keys=True)
        with self._lock:
            self.requests.append(body)
            self.authorizations.append(authorization)
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self._hold is not None and self.in_flight >= self._hold:
                self._reached.set()
        return attempt

    def _end(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self.send_error(404)
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                authorization = self.headers.get("Authorization", "")
                attempt = server._begin(body, authorization)
                try:
                    if server._hold is not None:
                        server._reached.wait(server._hold_timeout_s)
                    reply = server.policy(body, attempt)
                    if reply.delay_s:
                        server._stopping.wait(reply.delay_s)  # cut short when the server stops
                    payload = (
                        completion_json(reply.text, body.get("model", ""))
                        if reply.status == 200
                        # Echoing the credentials, as a careless proxy might, tests that error
                        # messages are redacted before they reach any file.
                        else {"error": {"message": f"scripted HTTP {reply.status} for {authorization}", "type": "test", "code": None}}
                    )
                    data = json.dumps(payload).encode()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a slow reply
                finally:
                    server._end()

        return Handler


def write_responses(path, model: str, rows: list[dict[str, Any]]) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({**row, "model": model}, ensure_ascii=False) + "\n")
    return str(path)
