"""One process of the two-process `pdpo pipeline` run in test_multihost_pipeline.py (run as a
script, not collected): `pdpo` itself, with an audit hook that lists every file this process
opens for writing or renames into place under PDPO_TEST_WATCH, one path per line in
PDPO_TEST_WRITES."""

from __future__ import annotations

import os
import sys

WATCHED = os.path.realpath(os.environ["PDPO_TEST_WATCH"])
WRITES = open(os.environ["PDPO_TEST_WRITES"], "w", buffering=1)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def watched(path) -> str | None:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str):
        return None  # a file descriptor
    path = os.path.realpath(path)
    return path if path.startswith(WATCHED + os.sep) else None


def record_writes(event: str, args: tuple) -> None:
    path = None
    if event == "open":
        name, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
        path = watched(name) if writing else None
    elif event in ("os.rename", "os.replace"):
        path = watched(args[1])
    if path is not None:
        WRITES.write(f"{event}\t{path}\n")


sys.addaudithook(record_writes)

from pdpo_jax import cli  # noqa: E402  (after the hook, so every write is seen)

sys.exit(cli.main(sys.argv[1:]))
