"""Putting a model behind the application: the engine, its scheduler, uvicorn, and shutting down.

`serve_forever` is `pdpo serve`: it serves until Ctrl-C (or SIGTERM), then stops taking requests,
lets the requests in flight finish for up to `drain_seconds`, and cancels the rest.
`BackgroundServer` runs the same server on a thread of this process (tests, tools). On several
processes, process 0 serves and the others run `follow_leader` (`pdpo_jax.serve.lockstep`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable

import jax
import uvicorn

from pdpo_jax.data.templates import TemplateError
from pdpo_jax.data.tokenization import PromptEncoder
from pdpo_jax.errors import PdpoError
from pdpo_jax.listening import base_url, listening_socket
from pdpo_jax.model import Model, eos_ids, require_tokenizer
from pdpo_jax.serve.app import Service, create_app
from pdpo_jax.serve.engine import DEFAULT_PROMPT_CACHE_MIB, SlotEngine
from pdpo_jax.serve.lockstep import LeaderEngine, follow
from pdpo_jax.serve.prompts import Renderer, chat_renderer, persona_renderer
from pdpo_jax.serve.scheduler import Scheduler

LOG = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_SLOTS = 8
DEFAULT_MAX_MODEL_LEN = 2048  # unless the model has fewer positions
WAITING_PER_SLOT = 4  # default queue bound: this many waiting requests per slot
BACKLOG = 256


class ServeError(PdpoError):
    """A server that cannot start: a port taken, a setting out of range."""


@dataclass(frozen=True)
class ServeOptions:
    slots: int = DEFAULT_SLOTS
    max_model_len: int | None = None  # None: min(DEFAULT_MAX_MODEL_LEN, the model's positions)
    max_waiting: int | None = None  # None: WAITING_PER_SLOT * slots
    api_key: str | None = None
    served_name: str | None = None  # None: the model directory's name
    chat_template: str | None = None  # Jinja text; None: the tokenizer's own
    persona_template: str | None = None  # a persona template preset or YAML file instead of a chat template
    drain_seconds: float = 10.0
    warm_up: bool = False  # compile every step shape and prompt width in the background from the start
    prompt_cache_mib: int = DEFAULT_PROMPT_CACHE_MIB  # prefilled prompts kept for reuse; 0: none


def served_name_for(model: Model) -> str:
    return model.path.name


def build_engine(model: Model, options: ServeOptions = ServeOptions(), mesh: Any = None) -> SlotEngine:
    """The slot engine `options` ask for (the same on every process of a multi-host server)."""
    positions = int(model.config.max_position_embeddings)
    max_model_len = options.max_model_len or min(DEFAULT_MAX_MODEL_LEN, positions)
    if not 1 <= max_model_len <= positions:
        raise ServeError(f"--max-model-len must be in [1, {positions}] (the model's positions), got {max_model_len}")
    if options.slots < 1:
        raise ServeError(f"--slots must be >= 1, got {options.slots}")
    if options.prompt_cache_mib < 0:
        raise ServeError(f"--prompt-cache-mib must be >= 0, got {options.prompt_cache_mib}")
    engine = SlotEngine(model, slots=options.slots, max_model_len=max_model_len, mesh=mesh,
                        prompt_cache_bytes=options.prompt_cache_mib << 20)
    if options.warm_up:
        engine.warm_up()
    return engine


def build_service(model: Model, options: ServeOptions = ServeOptions(), mesh: Any = None) -> Service:
    """The server's engine, scheduler and endpoints; on a run of several processes, process 0's,
    whose engine calls the other processes make too (`follow`)."""
    tokenizer = require_tokenizer(model)
    render, stop_ids = prompt_renderer(tokenizer, options)
    if render is None:
        LOG.warning("%s has no chat template: /v1/chat/completions will refuse requests (give --chat-template "
                    "or --template)", model.path)
        render = chat_renderer(tokenizer)
    engine = build_engine(model, options, mesh)
    if jax.process_count() > 1:
        engine = LeaderEngine(engine)
    max_waiting = options.max_waiting if options.max_waiting is not None else WAITING_PER_SLOT * options.slots
    scheduler = Scheduler(engine, stop_ids=tuple(dict.fromkeys(eos_ids(model) + stop_ids)), max_waiting=max_waiting)
    return Service(scheduler, tokenizer, options.served_name or served_name_for(model), render,
                   api_key=options.api_key)


def prompt_renderer(tokenizer: Any, options: ServeOptions) -> tuple[Renderer | None, tuple[int, ...]]:
    """How chat messages become prompt ids (None when the tokenizer has no chat template and none
    is given), and the ids that end a reply besides end of sequence: a persona template's end of turn."""
    if options.persona_template is not None:
        if options.chat_template is not None:
            raise ServeError("--template and --chat-template are two ways to render messages: give one")
        try:
            encoder = PromptEncoder(tokenizer, options.persona_template)
        except TemplateError as err:
            raise ServeError(f"--template {options.persona_template}: {err}") from None
        end_of_turn = encoder.end_of_turn_ids
        return persona_renderer(encoder), (end_of_turn if len(end_of_turn) == 1 else ())
    if options.chat_template is None and not getattr(tokenizer, "chat_template", None):
        return None, ()
    return chat_renderer(tokenizer, options.chat_template), ()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket for the server (`pdpo_jax.listening`); port 0 takes any free port."""
    return listening_socket(host, port, BACKLOG, ServeError)


class DrainingServer(uvicorn.Server):
    """uvicorn that drains before it stops: the first Ctrl-C (or SIGTERM, or `begin_drain()`) makes
    new requests get 503 `shutting_down` while those in flight run on for up to `drain_seconds`;
    then the server exits and whatever is still running is cancelled. A second Ctrl-C stops at once."""

    def __init__(self, config: uvicorn.Config, service: Service, drain_seconds: float):
        super().__init__(config)
        self.service, self.drain_seconds = service, drain_seconds
        self.drainer: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.drainer is None:
            self._captured_signals.append(sig)  # raised again once stopped, as uvicorn does
            self.begin_drain()
        else:
            super().handle_exit(sig, frame)

    def begin_drain(self) -> threading.Thread:
        if self.drainer is None:
            self.drainer = threading.Thread(target=self._drain, name="pdpo-serve-drain", daemon=True)
            self.drainer.start()
        return self.drainer

    def _drain(self) -> None:
        busy = self.service.scheduler.busy_slots() + self.service.scheduler.queued()
        LOG.warning("stopping: %d requests in flight get up to %g s to finish; new ones get 503", busy,
                    self.drain_seconds)
        if not self.service.scheduler.drain(self.drain_seconds):
            LOG.warning("stopping: cancelling the requests still running after %g s", self.drain_seconds)
            self.service.scheduler.stop(finish=False)
        self.should_exit = True


def make_server(service: Service, drain_seconds: float) -> DrainingServer:
    # the drain happens before uvicorn's own shutdown, which then only closes the connections
    config = uvicorn.Config(create_app(service), lifespan="off", access_log=False, log_level="warning",
                            timeout_graceful_shutdown=5)
    return DrainingServer(config, service, drain_seconds)


def serve_forever(service: Service, host: str, port: int, *, drain_seconds: float = 10.0,
                  announce: Callable[[str], None] = print) -> None:
    """Serves until interrupted, then drains: requests in flight get `drain_seconds` to finish."""
    sock = bind(host, port)
    service.scheduler.start()
    announce(f"serving {service.served_name} at {base_url(sock)}/v1 ({service.engine.slots} slots, "
             f"{service.engine.max_model_len} tokens of context); Ctrl-C stops")
    try:
        make_server(service, drain_seconds).run(sockets=[sock])
    finally:
        service.scheduler.stop(finish=False)
        sock.close()
        if isinstance(service.engine, LeaderEngine):
            service.engine.close()


def follow_leader(model: Model, options: ServeOptions = ServeOptions(), mesh: Any = None) -> None:
    """`pdpo serve` on a process other than 0: the same engine, running process 0's calls until it stops."""
    engine = build_engine(model, options, mesh)
    LOG.info("process %d follows process 0's server", jax.process_index())
    follow(engine)


class BackgroundServer:
    """The server on a thread of this process: `with BackgroundServer(service) as server: server.url`."""

    def __init__(self, service: Service, host: str = DEFAULT_HOST, port: int = 0, drain_seconds: float = 3.0):
        self.service = service
        self.sock = bind(host, port)
        self.url = base_url(self.sock)
        self.server = make_server(service, drain_seconds)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="pdpo-serve-http", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.service.scheduler.start()
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self, *, drain: bool = False) -> None:
        """Stops the server; with `drain` as Ctrl-C stops `pdpo serve` (503 for new requests while
        those in flight finish, for up to `drain_seconds`), otherwise at once."""
        if drain:
            self.server.begin_drain().join()
        self.server.should_exit = True
        self.thread.join(30)
        self.service.scheduler.stop(finish=False)
        self.sock.close()
        if isinstance(self.service.engine, LeaderEngine):  # the following processes return from `follow`
            self.service.engine.close()


def api_key_from_env(name: str | None) -> str | None:
    """The key in environment variable `name` (None: no key); an unset or empty variable is an error."""
    if name is None:
        return None
    key = os.environ.get(name, "")
    if not key:
        raise ServeError(f"--api-key-env {name}: the environment variable is unset or empty")
    return key
