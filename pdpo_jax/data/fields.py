"""Checks of the fields of an input record, with errors that name the file, line and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pdpo_jax.errors import DataError


def string_list(value: Any, path: str | Path, line: int | None, key: str, allow_empty: bool = False) -> tuple[str, ...]:
    """`value` as a tuple of stripped non-empty strings, or a DataError naming `key`."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise DataError(path, line, f"{key!r} must be a list of strings")
    items = tuple(item.strip() for item in value)
    if any(not item for item in items):
        raise DataError(path, line, f"{key!r} holds an empty string")
    if not items and not allow_empty:
        raise DataError(path, line, f"{key!r} is empty")
    return items
