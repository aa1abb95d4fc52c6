"""Writing files and committing directories so that a reader never sees a half-written one.

    atomic_write_bytes/text/json/jsonl   a file written to a temporary name and renamed into place
    append_jsonl, read_jsonl, jsonl_objects   JSON lines, appended durably and read back
    text_lines, json_lines, json_records      input files line by line, errors naming the line
    mark_done, is_done                   a stage's DONE marker, written last
    commit_directory                     a directory built beside its target and swapped in whole
    recover_directory                    what the next writer or reader does after a crash mid-swap

Everything a stage writes goes to a temporary name in the same folder and is renamed into place;
a stage's `DONE` marker is written last, so a stage without one is unfinished and is rerun.
Paths are `str | Path` throughout and every operation names the file or directory it produces,
so that another store can stand behind the same few calls.

On Cloud Storage (`gs://`, `pdpo_jax.object_store`) the same calls keep the same promises by other
means: a file is one upload (atomic: the old object or the new one, never a torn one); a directory
has no rename, so `commit_directory` stages a complete copy with a `COMMITTED` marker written last,
then publishes it to the target (marker removed, objects copied, marker written last), and
`is_committed` is how readers tell a published directory from a leftover.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

from pdpo_jax.errors import DataError
from pdpo_jax.object_store import as_path, filesystem, is_object_store, reported, store_error


def umask_file_mode() -> int:
    """The mode `open()` would give a new file (0o666 less the umask). `mkstemp` creates its files
    0o600, so a file renamed into place from it gets this mode first: run directories stay
    readable by whoever may read the others' files."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    if is_object_store(path):
        return _upload(path, data)
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
    """Appends one JSON line and flushes it to disk (a crash loses at most the line being written).
    An object cannot be appended to: on gs:// the file is uploaded again whole, with the line."""
    if is_object_store(path):
        old = read_bytes_if_exists(path) or b""
        _upload(path, old + (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Reads a JSON-lines file, tolerating a torn last line left by a crash mid-write."""
    records = []
    lines = as_path(path).read_text(encoding="utf-8").splitlines()
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


def jsonl_objects(path: str | Path, error: type[Exception] = ValueError, *, gzipped: bool = False
                  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """`("file:line", object)` for every non-blank line of a JSON-lines file of objects (gzip-compressed
    with `gzipped`); anything else raises `error` naming the file and line."""
    with (gzip.open(open_file(path, "rb"), "rt", encoding="utf-8") if gzipped else open_file(path, "r")) as handle:
        lines = enumerate(handle, start=1)
        while True:
            try:
                number, line = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError, UnicodeDecodeError) as err:
                if not gzipped:
                    raise
                raise error(f"{path}: not a readable gzip file ({err})") from None
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: not valid JSON ({err.msg})") from None
            except RecursionError:
                raise error(f"{where}: not valid JSON (nested too deeply)") from None
            if not isinstance(row, dict):
                raise error(f"{where}: expected a JSON object")
            yield where, row


# --- input files, line by line -------------------------------------------------------------------


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its end-of-line characters), decoding UTF-8 strictly."""
    with open_file(path, "rb") as handle:
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
        yield number, parse_json(line, path, number)


def parse_json(text: str, path: str | Path, line: int | None = None) -> Any:
    """The JSON value of `text` (the whole of `path`, or its line `line`); DataError naming the place
    where it is not JSON, or nests too deeply for the parser (a line of 100,000 `[`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = line if line is not None else err.lineno
        raise DataError(path, where, f"not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise DataError(path, line, "not valid JSON (nested too deeply)") from None


def open_file(path: str | Path, mode: str = "r"):
    """`open(path, mode)` (UTF-8 in text mode), for a local path or a gs:// object."""
    encoding = None if "b" in mode else "utf-8"
    if is_object_store(path):
        with reported(path):  # no credentials, no endpoint: one line
            return as_path(path).open(mode, encoding=encoding)
    return open(path, mode, encoding=encoding)


def read_bytes_if_exists(path: str | Path) -> bytes | None:
    try:
        with open_file(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _upload(path: str | Path, data: bytes):
    """One object written whole by a single upload."""
    try:
        filesystem().pipe_file(os.fspath(path), data)
    except Exception as err:  # noqa: BLE001
        raise store_error(err, path) from None
    return as_path(path)


# --- stage markers ----------------------------------------------------------------------------------

DONE_MARKER = "DONE"


def mark_done(stage_dir: str | Path, summary: dict[str, Any] | None = None) -> None:
    atomic_write_json(as_path(stage_dir) / DONE_MARKER, summary or {})


def is_done(stage_dir: str | Path) -> bool:
    return (as_path(stage_dir) / DONE_MARKER).exists()


# --- directories ------------------------------------------------------------------------------------

OLD_SUFFIX = ".old"  # `<name>.old`: the previous copy, set aside for the moment of a swap
BUILDING_INFIX = ".tmp-"  # `<name>.tmp-<tag>`: a copy being built


@contextlib.contextmanager
def commit_directory(target: str | Path, *, replace: bool = True, tag: str | None = None,
                     commit: bool = True, local_staging: bool = False) -> Iterator[Path]:
    """Yields an empty directory beside `target` to build it in; when the block ends without an
    error the directory becomes `target` whole, and when it raises, `target` is left as it was.

        with commit_directory(stage_dir / "best") as building:
            write_params(building, params)

    The steps, and what a crash after each leaves for the next call (or `recover_directory`):

      1. build in `<name>.tmp-<tag>`: `target` is untouched; the next call deletes the half-built
         copy.
      2. rename `target` to `<name>.old` (when it exists): `target` is missing and `<name>.old`
         holds the previous copy; the next call puts it back, so the previous copy is never lost.
      3. rename the new copy to `target`: done; the next call deletes a leftover `<name>.old`.
      4. delete `<name>.old`.

    `replace=True`: the caller is the only writer of `target` (a run directory's lock sees to
    that), so every leftover copy is a crash's and is deleted. `replace=False`: writers may race
    to create `target` and the first one wins: `target` existing raises `FileExistsError`, another
    writer committing first makes step 3 fail (`OSError`), and of the leftover copies only those
    of this host's finished processes are deleted.

    The processes of one multi-process save all enter with the same `tag`; the one with
    `commit=True` prepares, commits or cleans up, and the others only write into the directory
    it made (the caller synchronises them before and after the block).

    On gs:// the directory yielded is on the bucket too (orbax writes there, from every process),
    or with `local_staging` a local temporary folder, uploaded when the block ends, for writers
    that need a file system (safetensors, tokenizers, archives).
    """
    if is_object_store(target):
        with _commit_object_directory(target, replace=replace, tag=tag, commit=commit,
                                      local_staging=local_staging) as building:
            yield building
        return
    target = Path(target)
    building = target.with_name(f"{target.name}{BUILDING_INFIX}{tag or _writer_tag()}")
    if not commit:
        yield building
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target, only_dead_writers=not replace)
    if not replace and target.exists():
        raise FileExistsError(f"{target} already exists")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        yield building
        if replace and target.exists():
            os.replace(target, _old_copy(target))
        os.rename(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        recover_directory(target, only_dead_writers=True)  # the previous copy back, had step 3 failed
        raise
    _sync_directory(target.parent)
    shutil.rmtree(_old_copy(target), ignore_errors=True)


def recover_directory(target: str | Path, *, only_dead_writers: bool = False) -> None:
    """Undoes what a crash inside `commit_directory` left beside `target`: the previous copy goes
    back when `target` is missing (and is deleted when it is not), and half-built copies are
    deleted: all of them, or with `only_dead_writers` those of this host's finished processes."""
    if is_object_store(target):
        _recover_object_directory(as_path(target), only_dead_writers=only_dead_writers)
        return
    target = Path(target)
    old = _old_copy(target)
    if old.is_dir():
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)
    for building in target.parent.glob(f"{target.name}{BUILDING_INFIX}*"):
        if not only_dead_writers or _built_by_finished_process(building.name[len(target.name) + len(BUILDING_INFIX):]):
            shutil.rmtree(building, ignore_errors=True)


def _old_copy(target: Path) -> Path:
    return target.with_name(target.name + OLD_SUFFIX)


def _writer_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _built_by_finished_process(tag: str) -> bool:
    """True for a `_writer_tag()` of this host whose process has ended."""
    host, _, pid = tag.rpartition("-")[0].rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _sync_directory(path: Path) -> None:
    """Flushes a directory's entries (the renames in it) to disk, where the platform allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- directories on an object store -----------------------------------------------------------------

COMMIT_MARKER = "COMMITTED"  # written last into a directory on gs://; without it the directory is not there


def is_committed(directory: str | Path) -> bool:
    """Whether a directory is there to be read: on disk, that it exists (a rename committed it);
    on gs://, that its COMMITTED marker does (objects without it are a write in progress or the
    leftover of one, and every reader treats the directory as absent)."""
    if is_object_store(directory):
        return (as_path(directory) / COMMIT_MARKER).exists()
    return Path(directory).is_dir()


@contextlib.contextmanager
def _commit_object_directory(target: str | Path, *, replace: bool, tag: str | None, commit: bool,
                             local_staging: bool = False) -> Iterator[Any]:
    """`commit_directory` on gs://, where no rename is atomic (or cheap). The steps, and what a
    crash after each leaves for the next call (`_recover_object_directory`):

      1. build in `<name>.tmp-<tag>/`: `target` is untouched; the next call deletes the copy.
      2. write `<name>.tmp-<tag>/COMMITTED`: the new copy is complete; the next call publishes it.
      3. publish: delete `target/COMMITTED` (from here readers see no `target`), delete target's
         other objects, copy the staged objects over, write `target/COMMITTED` last: the next call
         publishes the staged copy again, so a crash loses neither the old copy nor the new one.
      4. delete the staged copy, its marker first (a staged copy without a marker is garbage).
    """
    target = as_path(target)
    building = target.parent / f"{target.name}{BUILDING_INFIX}{tag or _writer_tag()}"
    if not commit:
        yield building
        return
    _recover_object_directory(target, only_dead_writers=not replace)
    if not replace and is_committed(target):
        raise FileExistsError(f"{target} already exists")
    _delete_tree(building)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-")) if local_staging else None
    try:
        yield building if staging is None else staging
        if staging is not None:
            for path in sorted(staging.rglob("*")):
                if path.is_file():
                    _upload(building / path.relative_to(staging).as_posix(), path.read_bytes())
    except BaseException:
        _delete_tree(building)
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    _upload(building / COMMIT_MARKER, b"")
    _publish(building, target)


def _recover_object_directory(target: Any, *, only_dead_writers: bool) -> None:
    """Finishes a publish a crash interrupted and deletes staged copies that never completed (with
    `only_dead_writers`, which cannot tell another host's live writer on a bucket, it leaves
    incomplete copies alone: readers ignore them all the same)."""
    for building in sorted(target.parent.glob(f"{target.name}{BUILDING_INFIX}*")):
        if (building / COMMIT_MARKER).exists():
            _publish(building, target)
        elif not only_dead_writers:
            _delete_tree(building)
    if not is_committed(target) and not only_dead_writers:
        _delete_tree(target)  # the leftover of a publish whose staged copy is gone: never read


def _publish(building: Any, target: Any) -> None:
    fs = filesystem()
    source, dest = _key(building), _key(target)
    try:
        if fs.exists(f"{dest}/{COMMIT_MARKER}"):
            fs.rm_file(f"{dest}/{COMMIT_MARKER}")
        _delete_tree(target)
        for key in fs.find(source):
            relative = key[len(source) + 1:]
            if relative != COMMIT_MARKER:
                fs.copy(key, f"{dest}/{relative}")
        fs.pipe_file(f"{dest}/{COMMIT_MARKER}", b"")
        fs.rm_file(f"{source}/{COMMIT_MARKER}")
    except Exception as err:  # noqa: BLE001
        raise store_error(err, target) from None
    _delete_tree(building)


def _delete_tree(path: Any) -> None:
    fs = filesystem()
    try:
        keys = fs.find(_key(path))
        if keys:
            fs.rm(keys)
    except FileNotFoundError:
        pass
    except Exception as err:  # noqa: BLE001
        raise store_error(err, path) from None


def _key(path: Any) -> str:
    return os.fspath(path)[len("gs://"):].rstrip("/")
