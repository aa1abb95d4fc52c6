"""A model opened for one role in building preferences: the generator or the reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdpo_jax.data import PromptEncoder
from pdpo_jax.model import Model


@dataclass
class Side:
    """A model with what a record says about it (its name as configured and its digest)."""

    name: str  # as configured
    model: Model
    encoder: PromptEncoder
    digest: str
    mesh: Any  # the run's mesh the weights were placed on as they were read
