"""Serving on several hosts: process 0 decides, every process runs the same jitted programs.

A model sharded over a multi-host mesh is one program on every host: each `admit` and `step`
is a computation all processes must enter together, with the same arguments. Process 0 answers
HTTP and runs the scheduler as on one host, but through `LeaderEngine`, which first sends each
engine call (which slot takes which prompt with which settings, which slots a step runs) to the
other processes; they run `follow`, which receives the calls one by one and makes them on their
own `SlotEngine`, until process 0 says stop. The calls travel by `pdpo_jax.parallel.agree` (a
broadcast from process 0 over the devices), so they arrive in the order they were made.

While no request is running the scheduler ticks `keepalive` about once a second, so the other
processes are never left waiting in one broadcast for long.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pdpo_jax.parallel import agree
from pdpo_jax.serve.engine import SlotEngine, SlotRequest, StepResult


class LeaderEngine:
    """A SlotEngine on process 0 whose every call is first sent to the following processes;
    otherwise used exactly as the engine (its attributes are the engine's)."""

    def __init__(self, engine: SlotEngine):
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def admit(self, slot: int, request: SlotRequest) -> None:
        agree({"call": "admit", "slot": int(slot), "request": _request_fields(request)})
        self.engine.admit(slot, request)

    def step(self, busy: np.ndarray) -> StepResult:
        shape = self.engine.step_shape(busy)  # what is compiled here decides; the others follow
        agree({"call": "step", "busy": np.asarray(busy, bool).tolist(), "shape": list(shape)})
        return self.engine.step(busy, shape)

    def keepalive(self) -> None:
        agree({"call": "keepalive"})

    def close(self) -> None:
        """Lets the following processes return from `follow`."""
        agree({"call": "stop"})


def follow(engine: SlotEngine) -> int:
    """Makes process 0's engine calls on `engine` until it stops; the number of steps run."""
    steps = 0
    while True:
        call = agree(None)
        if call["call"] == "admit":
            engine.admit(call["slot"], SlotRequest(**{**call["request"],
                                                      "prompt_ids": tuple(call["request"]["prompt_ids"])}))
        elif call["call"] == "step":
            engine.step(np.asarray(call["busy"], bool), tuple(call["shape"]))
            steps += 1
        elif call["call"] == "stop":
            return steps


def _request_fields(request: SlotRequest) -> dict[str, Any]:
    fields = dataclasses.asdict(request)
    fields["prompt_ids"] = [int(t) for t in request.prompt_ids]
    return fields
