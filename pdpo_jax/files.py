"""Atomic file output and stage markers: a reader never sees a half-written file.

Everything a stage writes goes to a temporary name in the same folder and is renamed into place;
a stage's `DONE` marker is written last, so a stage without one is unfinished and is rerun.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def umask_file_mode() -> int:
    """The mode `open()` would give a new file (0o666 less the umask). `mkstemp` creates its files
    0o600, so a file renamed into place from it gets this mode first: run directories stay
    readable by whoever may read the others' files."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, umask_file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    # allow_nan=False: NaN/inf are not JSON; callers turn "undefined" into None first.
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: list[Any]) -> Path:
    text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
    return atomic_write_text(path, text)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Appends one JSON line and flushes it to disk (a crash loses at most the line being written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Reads a JSON-lines file, tolerating a torn last line left by a crash mid-write."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not valid JSON") from None
    return records


def jsonl_objects(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[str, dict[str, Any]]]:
    """`("file:line", object)` for every non-blank line of a JSON-lines file of objects; anything
    else raises `error` naming the file and line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{where}: expected a JSON object")
            yield where, row


DONE_MARKER = "DONE"


def mark_done(stage_dir: str | Path, summary: dict[str, Any] | None = None) -> None:
    atomic_write_json(Path(stage_dir) / DONE_MARKER, summary or {})


def is_done(stage_dir: str | Path) -> bool:
    return (Path(stage_dir) / DONE_MARKER).exists()
