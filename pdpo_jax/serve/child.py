"""`pdpo serve` as a child process for the length of a `with` block: how the judge stage runs
an open judge model on this machine.

The child listens on a free loopback port (`--port 0`, read back from the line it prints once
it serves) and requires a key made up for this one run, handed over in an environment variable,
so no other local process can use it. Leaving the block stops it (SIGINT: requests in flight are
cancelled), killing it if it does not exit in time.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from pdpo_jax.errors import RunFailed

KEY_ENV = "PDPO_SERVE_CHILD_KEY"
READY = re.compile(r"^serving \S+ at (http://\S+/v1) ")
STOP_SECONDS = 30


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key_env: str


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


@contextlib.contextmanager
def served_model(model: str, *, served_name: str, slots: int, max_model_len: int | None = None,
                 startup_seconds: float = 1800) -> Iterator[Endpoint]:
    """Runs `pdpo serve --model MODEL` until the block ends; yields where to reach it. The key is
    set in this process's environment (KEY_ENV) for the block, for clients that read it there."""
    key = secrets.token_urlsafe(24)
    command = [sys.executable, "-m", "pdpo_jax.cli", "serve", "--model", model, "--port", "0",
               "--served-model-name", served_name, "--api-key-env", KEY_ENV, "--slots", str(slots),
               "--drain-seconds", "1"]
    if max_model_len is not None:
        command += ["--max-model-len", str(max_model_len)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, KEY_ENV: key})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(child.stdout, lines), daemon=True).start()
    previous_key = os.environ.get(KEY_ENV)
    try:
        url = None
        while url is None:
            try:
                line = lines.get(timeout=startup_seconds)
            except queue.Empty:
                raise RunFailed(f"pdpo serve --model {model} did not start within {startup_seconds:.0f} s") from None
            if line is None:
                raise RunFailed(f"pdpo serve --model {model} exited with status {child.wait()} before serving "
                                f"(its message is above)")
            match = READY.match(line)
            url = match.group(1) if match else None
        os.environ[KEY_ENV] = key
        yield Endpoint(url, served_name, KEY_ENV)
    finally:
        if previous_key is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = previous_key
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
