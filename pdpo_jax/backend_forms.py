"""Which form a few hot operations take on each backend: the form measured faster on XLA's CPU
backend, or the textbook form.

Single-token fp32 attention scores, greedy argmax, the categorical draw and the top-p nucleus
each have a CPU-tuned form that was measured faster than the textbook form on CPU
(docs/results.md). No such measurement exists for TPU or GPU, so computations compiled for them
take the textbook form (docs/design.md, "Which backend takes which form").
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Literal

import jax

Form = Literal["cpu-tuned", "textbook"]
FORMS: tuple[Form, ...] = ("cpu-tuned", "textbook")

_forced: contextvars.ContextVar[Form | None] = contextvars.ContextVar("forced_form", default=None)


def by_backend(*args: Any, cpu_tuned: Callable, textbook: Callable) -> Any:
    """`cpu_tuned(*args)` in a computation compiled for CPU, `textbook(*args)` on TPU and GPU."""
    forced = _forced.get()
    if forced is not None:
        return (cpu_tuned if forced == "cpu-tuned" else textbook)(*args)
    # Chosen when the computation is lowered, not when it is traced: `pdpo plan` traces on a CPU
    # host the programs it compiles for a TPU slice.
    return jax.lax.platform_dependent(*args, cpu=cpu_tuned, default=textbook)


@contextlib.contextmanager
def forced_form(form: Form) -> Iterator[None]:
    """Every `by_backend` traced inside the block takes `form` whatever the backend, so both forms
    can be tested against each other on CPU (and measured on an accelerator).

    Only what is traced inside the block is affected: a function jitted and traced earlier for the
    same shapes keeps the form it was compiled with.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    token = _forced.set(form)
    try:
        yield
    finally:
        _forced.reset(token)
