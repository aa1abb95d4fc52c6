"""A model served by the run's own processes for the length of a `with` block: how the judge
stage serves an open judge model (`judge.serve`) on the devices the run already holds.

In process rather than as a child `pdpo serve`: an accelerator belongs to one process (a TPU
host's chips cannot be opened by a second one, and the first process on a GPU preallocates most of
its memory), so a child could not use the devices while the run holds them. Process 0 serves on a
free loopback port and requires a key made up for the block, handed to the judge in an environment
variable, so no other local process can use it. On a multi-host mesh the other processes run
process 0's engine calls (`follow`) until its server stops, as `pdpo serve` does on a slice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pdpo_jax.model import load_model
from pdpo_jax.parallel import is_primary
from pdpo_jax.serve.server import BackgroundServer, ServeOptions, build_service, follow_leader

LOG = logging.getLogger(__name__)
KEY_ENV = "PDPO_SERVED_MODEL_KEY"


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key_env: str


@contextlib.contextmanager
def served_in_process(model_path: str, *, served_name: str, slots: int, mesh: Any = None,
                      load_options: dict[str, Any] | None = None) -> Iterator[Endpoint | None]:
    """Serves `model_path` until the block ends; yields where to reach it on process 0. The other
    processes of a multi-host mesh follow process 0's server until it stops and then yield None,
    so their block runs after process 0's has ended: it must not wait on process 0."""
    model = load_model(model_path, mesh=mesh, **(load_options or {}))
    key = secrets.token_urlsafe(24)
    options = ServeOptions(slots=slots, served_name=served_name, api_key=key, drain_seconds=1.0)
    if not is_primary():
        follow_leader(model, options, mesh)
        yield None
        return
    previous_key = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = key
    try:
        with BackgroundServer(build_service(model, options, mesh)) as server:
            LOG.info("serving %s as %r at %s/v1", model_path, served_name, server.url)
            yield Endpoint(server.url + "/v1", served_name, KEY_ENV)
    finally:
        if previous_key is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = previous_key
