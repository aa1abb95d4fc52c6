"""One run at a time in a run directory: a second `pdpo` command started on the same folder (from
another shell, by mistake) is refused with the holder's name instead of interleaving its writes
with the first's.

The lock is an advisory `flock` on `<run_dir>/.lock`, which also records who holds it (pid, host,
command, start time) for the message. The kernel releases it when the holder exits, however it
exits, so a crashed run never leaves a stale lock behind. A file system without locks (some
bucket mounts) gets a warning and no lock.

A run directory on Cloud Storage (`gs://`) has no flock; there the lock is the object
`<run_dir>/.lock`, created only if absent (`ifGenerationMatch=0`, so of two launches exactly one
creates it), holding the holder's pid, host, command and start time and a heartbeat the holder
renews every HEARTBEAT_S while it runs, and deleted when the block ends. Nobody releases it for a
killed holder, so a launch that finds it:
  - takes it over when the holder is a finished process of this very host (a rerun after kill -9);
  - is refused naming the holder while the heartbeat is fresh;
  - is refused with the command that clears it when the heartbeat stopped over STALE_AFTER_S ago
    (the holder's host died or lost its network), since only a person can tell that it is gone.
A holder whose heartbeat finds the lock object gone, or holding another launch, no longer has the
run directory to itself: two runs would write into one folder. It stops at once (RunDirLost,
raised in the main thread through LOST_SIGNAL) rather than write on beside the other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pdpo_jax.errors import PdpoError, RunFailed
from pdpo_jax.object_store import (create_if_absent, delete_if_generation, is_object_store, read_with_generation,
                                   replace_if_generation)

LOCK_FILE = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_held: set = set()  # run directories this process holds (a nested claim is a no-op)
HEARTBEAT_S = 30.0  # how often the holder of a gs:// lock renews it
STALE_AFTER_S = 600.0  # a gs:// lock whose heartbeat is older than this is reported as stale
LOST_SIGNAL = signal.SIGUSR1  # how the heartbeat thread stops the main thread when the lock is lost


class RunDirBusy(PdpoError):
    """Another process holds the run directory."""


class RunDirLost(RunFailed):
    """This run's gs:// lock was deleted or taken by another launch while it ran."""


def holder_description(lock_path: Path) -> str:
    try:
        return _describe(json.loads(lock_path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return "another process"


def _describe(holder: dict) -> str:
    try:
        return f"pid {holder['pid']} on {holder['host']} ({holder['command']}, started {holder['started']})"
    except (KeyError, TypeError):
        return "another process"


def _holder(command: str | None) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Holds `<run_dir>/.lock` for the duration of the block; raises RunDirBusy at once when
    another process holds it."""
    if is_object_store(run_dir):
        with _object_lock(os.fspath(run_dir).rstrip("/"), command) as lock_path:
            yield lock_path
        return
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
        holder = _holder(command)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        _held.add(key)
        yield lock_path
    finally:
        _held.discard(key)
        os.close(fd)  # releases the flock


def _busy(run_dir: str, holder: dict) -> RunDirBusy:
    return RunDirBusy(
        f"{run_dir} is in use by {_describe(holder)}; wait for it to finish or stop it "
        "before starting another run there (two runs would interleave their writes)")


@contextlib.contextmanager
def _object_lock(run_dir: str, command: str | None) -> Iterator[str]:
    """The lock object of a gs:// run directory, held (and its heartbeat renewed) for the block."""
    lock_path = f"{run_dir}/{LOCK_FILE}"
    if run_dir in _held:
        yield lock_path
        return
    holder = _holder(command)
    holder["heartbeat"] = time.time()
    generation = create_if_absent(lock_path, _encode(holder))
    while generation is None:
        found = read_with_generation(lock_path)
        if found is None:  # released meanwhile: try again
            generation = create_if_absent(lock_path, _encode(holder))
            continue
        data, current = found
        try:
            other = json.loads(data)
        except ValueError:
            other = {}
        if not _finished_here(other):
            age = time.time() - _heartbeat(other)
            if age > STALE_AFTER_S:
                raise RunDirBusy(
                    f"{run_dir} is locked by {_describe(other)}, whose heartbeat stopped {age / 60:.0f} min ago; "
                    f"if that run is gone, clear the lock with `gcloud storage rm {lock_path}` and launch again")
            raise _busy(run_dir, other)
        generation = replace_if_generation(lock_path, _encode(holder), current)  # None: someone else was faster
    holder["generation"] = generation
    stop = threading.Event()
    lost: list[str] = []  # the heartbeat's reason, for the main thread's RunDirLost
    previous = _stop_main_thread_on_loss(lost)
    heartbeat = threading.Thread(target=_renew, args=(lock_path, holder, stop, lost, previous is not None),
                                 daemon=True, name="run-lock-heartbeat")
    _held.add(run_dir)
    heartbeat.start()
    try:
        yield lock_path
    finally:
        try:
            stop.set()
            heartbeat.join()
        finally:
            if previous is not None:
                signal.signal(LOST_SIGNAL, previous)
            _held.discard(run_dir)
            if not lost:  # a lost lock is not ours to delete
                delete_if_generation(lock_path, holder["generation"])


def _stop_main_thread_on_loss(lost: list[str]):
    """Installs the handler that raises RunDirLost in the main thread; the previous handler, or
    None when the lock is taken outside the main thread (then a loss is only warned about)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(_signum, _frame):
        raise RunDirLost(lost[0] if lost else "this run lost its run directory's lock")

    return signal.signal(LOST_SIGNAL, stop)


def _renew(lock_path: str, holder: dict, stop: threading.Event, lost: list[str], can_stop: bool) -> None:
    while not stop.wait(HEARTBEAT_S):
        holder["heartbeat"] = time.time()
        try:
            renewed = replace_if_generation(lock_path, _encode(holder), holder["generation"])
        except PdpoError as err:  # the store unreachable for a moment: try again at the next beat
            print(f"warning: {lock_path}: heartbeat not renewed ({err})", file=sys.stderr)
            continue
        if renewed is None:
            reason = _why_lost(lock_path, holder)
            if reason is None:  # our own renewal had landed after all (a retried upload): carry on
                continue
            if stop.is_set():
                return  # the block is ending anyway
            lost.append(reason)
            if can_stop:
                signal.pthread_kill(threading.main_thread().ident, LOST_SIGNAL)
            else:
                print(f"warning: {reason}", file=sys.stderr)
            return
        holder["generation"] = renewed


def _why_lost(lock_path: str, holder: dict) -> str | None:
    """What became of the lock object whose generation we no longer hold: the message the run
    stops with, or None when it is still ours (its generation moved under a retried upload)."""
    run_dir = lock_path.rsplit("/", 1)[0]
    try:
        found = read_with_generation(lock_path)
    except PdpoError:
        found = None
    if found is None:
        return (f"{run_dir}: this run's lock {lock_path} was deleted while it ran (`gcloud storage rm`?), so "
                "nothing keeps a second run out; stopped. Make sure no other run uses this run directory, then "
                "rerun the same command to resume")
    data, generation = found
    try:
        other = json.loads(data)
    except ValueError:
        other = {}
    if all(other.get(key) == holder[key] for key in ("pid", "host", "started")):
        holder["generation"] = generation
        return None
    return (f"{run_dir} was taken over by {_describe(other)} while this run held it; stopped so that two runs "
            "do not write into one run directory (the other one goes on)")


def _heartbeat(holder: dict) -> float:
    try:
        return float(holder["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return 0.0  # no readable heartbeat: as old as can be


def _encode(holder: dict) -> bytes:
    return (json.dumps({k: v for k, v in holder.items() if k != "generation"}) + "\n").encode()


def _finished_here(holder: dict) -> bool:
    """True when the holder was a process of this host that has ended (killed, crashed)."""
    if not isinstance(holder, dict) or holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return False
