"""One run at a time in a run directory: a second `pdpo` command started on the same folder (from
another shell, by mistake) is refused with the holder's name instead of interleaving its writes
with the first's.

The lock is an advisory `flock` on `<run_dir>/.lock`, which also records who holds it (pid, host,
command, start time) for the message. The kernel releases it when the holder exits, however it
exits, so a crashed run never leaves a stale lock behind. A file system without locks (some
bucket mounts) gets a warning and no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pdpo_jax.errors import PdpoError

LOCK_FILE = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_held: set[Path] = set()  # run directories this process holds (a nested claim is a no-op)


class RunDirBusy(PdpoError):
    """Another process holds the run directory."""


def holder_description(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text(encoding="utf-8"))
        return (f"pid {holder['pid']} on {holder['host']} ({holder['command']}, started {holder['started']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Holds `<run_dir>/.lock` for the duration of the block; raises RunDirBusy at once when
    another process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_FILE
    key = run_dir.resolve()
    if key in _held:
        yield lock_path
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(
                f"{run_dir} is in use by {holder_description(lock_path)}; wait for it to finish or stop it "
                "before starting another run there (two runs would interleave their writes)"
            ) from None
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                raise
            print(f"warning: {lock_path}: this file system has no locks, so nothing stops a second run "
                  "in this folder", file=sys.stderr)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        _held.add(key)
        yield lock_path
    finally:
        _held.discard(key)
        os.close(fd)  # releases the flock
