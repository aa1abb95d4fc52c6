"""Who gets a slot when: a bounded queue of jobs in front of the slot engine, run by one thread.

The thread loops: put waiting jobs into free slots (a prefill each), run one engine step over
all slots, hand every busy slot's token to its job, and free at once every slot whose job
finished (an end-of-sequence id, its token budget, its own stop rule) or was cancelled (the
client went away). Requests beyond `max_waiting` are refused (`QueueFull`), never parked
without bound. `drain()` stops taking jobs and waits for those in flight; `stop()` finishes or
cancels what is in flight, as told.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pdpo_jax.serve.engine import SlotEngine, SlotRequest

LOG = logging.getLogger(__name__)
DRAIN_POLL_SECONDS = 0.05
KEEPALIVE_SECONDS = 1.0  # while idle, the engine hears from the scheduler this often (serving on several hosts)


class QueueFull(RuntimeError):
    """More requests are waiting than the scheduler accepts."""


class ShuttingDown(RuntimeError):
    """The scheduler stopped taking requests."""


@dataclass(frozen=True)
class Token:
    """One picked token with its log-probability and the best alternatives (when asked for)."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)
class Job:
    """One sequence to generate. `on_token(token) -> bool` is called from the scheduler's thread
    for every token (True: the job's own stop rule says it is done, e.g. a stop string);
    `on_finish(reason)` exactly once, reason "stop", "length", "cancelled" or "error"."""

    request: SlotRequest
    max_tokens: int
    on_token: Callable[[Token], bool]
    on_finish: Callable[[str], None]
    generated: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    """Runs `engine` on its own thread; `submit` jobs from any thread."""

    def __init__(self, engine: SlotEngine, *, stop_ids: tuple[int, ...], max_waiting: int):
        self.engine = engine
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.max_waiting = int(max_waiting)
        self.slots: list[Job | None] = [None] * engine.slots
        self.waiting: collections.deque[Job] = collections.deque()
        self.wake = threading.Condition()
        self.accepting = True
        self.running = False
        self.thread: threading.Thread | None = None
        self.steps = 0

    # ------------------------------------------------------------------ from any thread

    def submit(self, job: Job) -> None:
        with self.wake:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting for a slot")
            self.waiting.append(job)
            self.wake.notify()

    def busy_slots(self) -> int:
        return sum(job is not None for job in self.slots)

    def queued(self) -> int:
        return len(self.waiting)

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._run, name="pdpo-serve-scheduler", daemon=True)
        self.thread.start()

    def drain(self, timeout: float) -> bool:
        """Stops taking jobs (`submit` raises ShuttingDown) and waits up to `timeout` seconds for
        the jobs in flight and in the queue to finish: whether they all did."""
        with self.wake:
            self.accepting = False
        deadline = time.monotonic() + timeout
        while self._has_work() and self.thread is not None and self.thread.is_alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(DRAIN_POLL_SECONDS)
        return not self._has_work()

    def stop(self, *, finish: bool = False, timeout: float | None = None) -> None:
        """Stops taking jobs; with `finish` the jobs in flight run to their end first, otherwise
        (and whatever is still running after `timeout`) they are cancelled."""
        with self.wake:
            self.accepting = False
            if not finish:
                for job in [*self.waiting, *filter(None, self.slots)]:
                    job.cancel()
            self.running = False
            self.wake.notify()
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                for job in [*self.waiting, *filter(None, self.slots)]:
                    job.cancel()
                self.thread.join()
        self.engine.cancel_compiles()

    # ------------------------------------------------------------------ the scheduler's thread

    def _has_work(self) -> bool:
        return bool(self.waiting) or any(self.slots)

    def _run(self) -> None:
        try:
            while True:
                with self.wake:
                    while self.running and not self._has_work():
                        if not self.wake.wait(KEEPALIVE_SECONDS):
                            self.engine.keepalive()
                    if not self.running and not self._has_work():
                        return
                self._free_cancelled()
                self._admit_waiting()
                if any(self.slots):
                    self._step()
        except Exception:  # noqa: BLE001 - the thread must not die silently with requests waiting
            LOG.exception("the scheduler stopped on an error")
            with self.wake:
                self.accepting = False
                jobs = [*self.waiting, *filter(None, self.slots)]
                self.waiting.clear()
                self.slots = [None] * len(self.slots)
            for job in jobs:
                job.on_finish("error")

    def _finish(self, slot: int, reason: str) -> None:
        job = self.slots[slot]
        self.slots[slot] = None
        job.on_finish(reason)

    def _free_cancelled(self) -> None:
        for slot, job in enumerate(self.slots):
            if job is not None and job.cancelled.is_set():
                self._finish(slot, "cancelled")

    def _admit_waiting(self) -> None:
        while None in self.slots:
            with self.wake:
                if not self.waiting:
                    return
                job = self.waiting.popleft()
            if job.cancelled.is_set():
                job.on_finish("cancelled")
                continue
            slot = self.slots.index(None)
            self.engine.admit(slot, job.request)
            self.slots[slot] = job

    def _step(self) -> None:
        busy = np.array([job is not None for job in self.slots])
        result = self.engine.step(busy)
        self.steps += 1
        for slot in np.flatnonzero(busy):
            job = self.slots[slot]
            if job.cancelled.is_set():
                self._finish(slot, "cancelled")
                continue
            token_id = int(result.tokens[slot])
            if token_id in self.stop_ids:
                self._finish(slot, "stop")
                continue
            top = ()
            if job.request.top_logprobs:
                pairs = zip(result.top_ids[slot].tolist(), result.top_logprobs[slot].tolist())
                top = tuple(pairs)[: job.request.top_logprobs]
            job.generated += 1
            done = job.on_token(Token(token_id, float(result.logprobs[slot]), top))
            if done:
                self._finish(slot, "stop")
            elif job.generated >= job.max_tokens:
                self._finish(slot, "length")


def describe(scheduler: Scheduler) -> dict[str, Any]:
    """What `/health` reports."""
    engine = scheduler.engine
    return {"status": "ok" if scheduler.accepting else "draining", "slots": engine.slots, "busy": scheduler.busy_slots(), "waiting": scheduler.queued(),
            "max_model_len": engine.max_model_len, "steps": scheduler.steps,
            "compiled": {"prompt_widths": sorted(engine.widths_compiled), "step_views": sorted(engine.views_compiled),
                         "step_shapes": [list(shape) for shape in sorted(engine.step_shapes_compiled)]},
            "compiling": engine.pending_compiles(), "prompt_cache": engine.prompt_cache.describe()}
