"""`pdpo serve`: an OpenAI-compatible server on the JAX decoder, with continuous batching.

    engine     SlotEngine: fixed KV-cache slots, a prompt prefilled into a free slot, one jitted
               step over all slots with per-slot positions and sampling settings
    scheduler  Scheduler: the bounded queue and the thread that admits, steps and frees slots
    text       TextStream: ids to text as they arrive, cut at stop strings
    protocol   the OpenAI wire format: request checking, responses, chunks, error objects
    app        the Starlette application: endpoints, server-sent events, API key
    lockstep   several hosts: process 0's engine calls, made by the other processes too
    server     engine + scheduler + uvicorn: `serve_forever`, `BackgroundServer`
"""

from pdpo_jax.serve.engine import SlotEngine, SlotRequest
from pdpo_jax.serve.scheduler import Job, Scheduler
from pdpo_jax.serve.server import BackgroundServer, ServeOptions, build_service, serve_forever

__all__ = ["BackgroundServer", "Job", "Scheduler", "ServeOptions", "SlotEngine", "SlotRequest", "build_service",
           "serve_forever"]
