"""Reading text files line by line with errors that point at the line (invalid UTF-8, bad JSON)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pdpo_jax.data.errors import DataError


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its end-of-line characters), decoding UTF-8 strictly."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(path, number, f"invalid UTF-8 (byte {err.start} of the line)") from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            yield number, line.rstrip("\r\n")


def json_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON Lines file."""
    for number, record in _json_values(path):
        if not isinstance(record, dict):
            raise DataError(path, number, f"expected a JSON object, found {type(record).__name__}")
        yield number, record


def json_records(path: str | Path) -> Iterator[tuple[int, int | None, dict[str, Any]]]:
    """(line number, position in that line's array or None, object) for a file whose lines hold JSON
    objects or JSON arrays of objects (a whole data set may be one array on one line)."""
    for number, value in _json_values(path):
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for position, record in items:
            if not isinstance(record, dict):
                where = "" if position is None else f"item {position} of the array: "
                raise DataError(path, number, f"{where}expected a JSON object, found {type(record).__name__}")
            yield number, position, record


def _json_values(path: str | Path) -> Iterator[tuple[int, Any]]:
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(path, number, f"not valid JSON ({err.msg} at column {err.colno})") from None
        yield number, value


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
