"""Compiled programs by shape: compiled when first needed, or ahead of time on a thread of their own.

The engine runs a few jitted programs at a bounded set of shapes (rows and cache view for a step,
width for a prefill). Compiling one of the bundled model's steps takes seconds of CPU; done in the
middle of serving it stalls every request in flight. A `ProgramTable` holds the compiled program of
each shape (a `jax.stages.Compiled`, called without tracing again) and can compile shapes ahead on
one background thread, so the engine asks `is_ready` and runs a compiled shape that covers the one
it needs while the exact one compiles. `get` of a shape not compiled yet compiles it at once (or
waits for the background thread if it has already started on it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

LOG = logging.getLogger(__name__)


class ProgramTable:
    """`build(key)` -> a compiled program, memoized per key; `compile_ahead(keys)` queues keys for
    the background thread."""

    def __init__(self, name: str, build: Callable[[Hashable], Any]):
        self.name, self._build = name, build
        self._lock = threading.Lock()
        self._programs: dict[Hashable, Future] = {}
        self._background: ThreadPoolExecutor | None = None

    def get(self, key: Hashable) -> Any:
        """The compiled program for `key`, compiled now if nobody has started on it."""
        with self._lock:
            future = self._programs.get(key)
            if future is not None and future.cancel():  # queued behind other shapes: compile it here
                future = None
            mine = future is None
            if mine:
                future = self._programs[key] = Future()
        if mine:
            self._compile_into(key, future)
        return future.result()

    def is_ready(self, key: Hashable) -> bool:
        with self._lock:
            future = self._programs.get(key)
        return future is not None and future.done() and not future.cancelled() and future.exception() is None

    def ready(self) -> set:
        """The keys whose programs are compiled."""
        with self._lock:
            keys = list(self._programs)
        return {key for key in keys if self.is_ready(key)}

    def pending(self) -> int:
        """Keys queued or compiling."""
        with self._lock:
            return sum(not future.done() for future in self._programs.values())

    def compile_ahead(self, keys: Iterable[Hashable]) -> None:
        """Queues `keys` (those not compiled or queued already) for the background thread, in order."""
        with self._lock:
            if self._background is None:
                self._background = ThreadPoolExecutor(1, thread_name_prefix=f"pdpo-serve-compile-{self.name}")
            for key in keys:
                if key not in self._programs:
                    future = Future()
                    self._programs[key] = future
                    self._background.submit(self._run_queued, key, future)

    def close(self) -> None:
        """Drops the queued keys (a compile under way finishes on its thread)."""
        with self._lock:
            queued = [key for key, future in self._programs.items() if future.cancel()]
            for key in queued:
                del self._programs[key]
            if self._background is not None:
                self._background.shutdown(wait=False, cancel_futures=True)
                self._background = None

    def _run_queued(self, key: Hashable, future: Future) -> None:
        if future.set_running_or_notify_cancel():  # False: `get` or `close` took it off the queue
            self._compile_into(key, future, claimed=True)

    def _compile_into(self, key: Hashable, future: Future, claimed: bool = False) -> None:
        if not claimed:
            future.set_running_or_notify_cancel()
        start = time.perf_counter()
        try:
            program = self._build(key)
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits for the program
            with self._lock:
                self._programs.pop(key, None)
            future.set_exception(err)
            return
        LOG.info("compiled the %s program for %s in %.1f s", self.name, key, time.perf_counter() - start)
        future.set_result(program)
