"""Paths on Cloud Storage (`gs://bucket/...`) next to paths on disk, and the few object operations
that the run directory's commits and lock need beyond reading and writing whole files.

    as_path("runs/demo")             # pathlib.Path, exactly as before
    as_path("gs://bucket/demo")      # an etils.epath.Path: the same pathlib-like API, on gcsfs
    is_object_store(path)            # True for gs://
    create_if_absent(path, data)     # upload only if no object is there (ifGenerationMatch=0)
    replace_if_generation(path, data, generation)   # upload only over that very version

Why `etils.epath`: orbax, which writes our checkpoints, already takes epath paths, and an epath
path has pathlib's methods (`/`, `exists`, `read_text`, `glob`, `open`), so code that reads a run
directory reads one on a bucket without a second branch. For gs:// it runs on fsspec's gcsfs.

An object store is not a file system: an upload is atomic (a reader sees the old object or the new
one), but nothing renames a directory, and there are no locks. `pdpo_jax.storage` builds its
commits and `pdpo_jax.run_lock` its lock on that.

Errors a user can fix (no credentials, no such bucket, no endpoint at STORAGE_EMULATOR_HOST) are
raised as `ObjectStoreError`, one line naming the path.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Union

from pdpo_jax.cache_root import default_cache_root
from pdpo_jax.errors import PdpoError

# gcsfs (since 2025) asks a bucket's storage layout over gRPC the first time it touches a bucket,
# to serve zonal and hierarchical-namespace buckets. Off Google's network (an emulator, a test) that
# call waits 60 s and fails, once per filesystem object; the plain JSON-API client does everything
# a run needs. Set before gcsfs is first imported, which decides the class then.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _no_listing_cache() -> None:
    """gcsfs remembers folder listings for the life of the process; the hosts of a pod and a rerun
    after a crash read what other processes wrote, so every listing asks the store."""
    import fsspec.config

    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


_no_listing_cache()

# gcsfs logs every request that failed for good, with its traceback, before it raises the error; the
# error reaches the user as one line from us (and with --debug as a traceback), so the log is muted.
if logging.getLogger("gcsfs").level == logging.NOTSET:
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)

SCHEMES = ("gs://",)
_BOUNDARY = "pdpo-object-boundary"

AnyPath = Union[Path, "epath.Path"]  # noqa: F821 - epath is imported lazily


class ObjectStoreError(PdpoError):
    """A gs:// path that cannot be used: no credentials, no such bucket or object, no endpoint."""


def is_object_store(path: Any) -> bool:
    """True for a `gs://` path (a string, an epath path, anything `os.fspath` accepts)."""
    try:
        text = os.fspath(path)
    except TypeError:
        return False
    return isinstance(text, str) and text.startswith(SCHEMES)


def as_path(path: Any) -> AnyPath:
    """A `pathlib.Path` for a local path (unchanged behaviour), an `epath.Path` for `gs://`.

    `pathlib.Path("gs://b/x")` would fold the `//` into a local folder `gs:/b/x`: every path that
    may name a bucket goes through here instead."""
    if is_object_store(path):
        from etils import epath

        return epath.Path(os.fspath(path))
    return Path(path)


def absolute(path: Any) -> AnyPath:
    """`as_path(path)`, made absolute when it is local (a gs:// path always is)."""
    return as_path(path) if is_object_store(path) else Path(path).absolute()


def filesystem():
    """The gcsfs filesystem every gs:// operation shares (fsspec caches one per process).

    With STORAGE_EMULATOR_HOST set, gcsfs talks to that endpoint anonymously."""
    import fsspec

    return fsspec.filesystem("gs")


def _object_name(path: Any) -> tuple[str, str]:
    """("bucket", "key") of a gs:// path."""
    text = os.fspath(path)
    bucket, _, key = text[len("gs://"):].partition("/")
    return bucket, key


def create_if_absent(path: Any, data: bytes) -> int | None:
    """Uploads `data` to `path` only if no object is there; the new object's generation, or None
    when one exists already. The store decides, so of two racing writers exactly one wins."""
    return _upload(path, data, if_generation_match=0)


def replace_if_generation(path: Any, data: bytes, generation: int) -> int | None:
    """Uploads `data` over `path` only if the object there is still `generation`; the new
    generation, or None when the object changed or vanished meanwhile."""
    return _upload(path, data, if_generation_match=generation)


def read_with_generation(path: Any) -> tuple[bytes, int] | None:
    """(contents, generation) of the object at `path`, or None when there is none."""
    fs = filesystem()
    try:
        info = fs.info(_strip(path))
        data = fs.cat_file(_strip(path))
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - turned into a one-line error
        raise store_error(err, path) from None
    return data, int(info["generation"])


def delete_if_generation(path: Any, generation: int) -> bool:
    """Deletes the object at `path` only if it is still `generation`; whether it did."""
    from fsspec.asyn import sync

    fs = filesystem()
    bucket, key = _object_name(path)
    # The precondition alone decides on Cloud Storage; the look first also keeps emulators that
    # ignore it on DELETE (fake-gcs-server) from deleting another writer's object.
    current = read_with_generation(path)
    if current is None or current[1] != generation:
        return False
    try:
        sync(fs.loop, fs._call, "DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(generation))
    except (FileNotFoundError, FileExistsError):
        return False
    except Exception as err:  # noqa: BLE001
        if _status(err) == 412:
            return False
        raise store_error(err, path) from None
    return True


def _upload(path: Any, data: bytes, *, if_generation_match: int) -> int | None:
    from urllib.parse import quote

    from fsspec.asyn import sync

    fs = filesystem()
    bucket, key = _object_name(path)
    metadata = json.dumps({"name": key})
    body = (f"--{_BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{metadata}\r\n"
            f"--{_BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{_BOUNDARY}--".encode()
    try:
        reply = sync(fs.loop, fs._call, "POST", f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                     uploadType="multipart", ifGenerationMatch=str(if_generation_match),
                     headers={"Content-Type": f'multipart/related; boundary="{_BOUNDARY}"'}, data=body, json_out=True)
    except FileExistsError:  # 412: the precondition failed
        return None
    except Exception as err:  # noqa: BLE001
        if _status(err) == 412:
            return None
        raise store_error(err, path) from None
    return int(reply["generation"])


def upload_file(local: Path, url: Any) -> None:
    """Uploads the local file `local` as the object `url`: one object, there only once complete."""
    try:
        filesystem().put_file(os.fspath(local), _strip(url))
    except Exception as err:  # noqa: BLE001
        raise store_error(err, url) from None


def _strip(path: Any) -> str:
    return os.fspath(path)[len("gs://"):]


def _status(err: BaseException) -> int | None:
    code = getattr(err, "code", None)
    return code if isinstance(code, int) else None


# How the clients word a refusal for want of credentials or permission (gcsfs raises a 403 as a
# bare OSError "Forbidden: ...", a 401 as HttpError; google-auth finds no credentials at all).
_NO_ACCESS_WORDS = ("forbidden", "unauthorized", "credentials", "anonymous caller", "permission", "access denied")


def store_error(err: BaseException, path: Any = None) -> ObjectStoreError:
    """The one line a user reads for a failed gs:// operation on `path` (None: the operation's
    own words say which object)."""
    text = " ".join(str(err).split()) or type(err).__name__
    where = os.fspath(path) if path is not None else "Cloud Storage"
    bucket = "gs://" + _object_name(path)[0] if path is not None and is_object_store(path) else "the bucket"
    endpoint = os.environ.get("STORAGE_EMULATOR_HOST")
    status = _status(err)
    if isinstance(err, (ConnectionError, TimeoutError)) or "Cannot connect" in text or "ClientConnector" in type(err).__name__:
        to = f"the storage emulator at {endpoint} (STORAGE_EMULATOR_HOST)" if endpoint else "Cloud Storage"
        return ObjectStoreError(f"{where}: cannot reach {to}: {text}")
    if (status in (401, 403) or any(word in text.lower() for word in _NO_ACCESS_WORDS)
            or "DefaultCredentialsError" in type(err).__name__):
        return ObjectStoreError(
            f"{where}: no access to {bucket} ({text}); sign in with `gcloud auth application-default login` "
            "or run on a VM whose service account may use the bucket")
    if isinstance(err, FileNotFoundError) or status == 404:
        return ObjectStoreError(f"{where}: not found (does the bucket {bucket} exist?)")
    return ObjectStoreError(f"{where}: {type(err).__name__}: {text}")


def is_store_failure(err: BaseException) -> bool:
    """Whether `err` was raised by the Cloud Storage client stack (gcsfs, aiohttp, google-auth)
    rather than by our code: what the command line turns into `store_error`'s one line."""
    if type(err).__module__.split(".")[0] in ("gcsfs", "aiohttp", "google"):
        return True
    return type(err) is OSError and str(err).startswith("Forbidden:")  # gcsfs's words for a 403


@contextlib.contextmanager
def reported(path: Any) -> Iterator[None]:
    """For a gs:// `path`: checks once that the storage endpoint answers, then turns a failure of
    the block (no access, no endpoint) into `store_error`'s one line naming `path`. A missing object
    stays FileNotFoundError and our own errors pass through. A local path: the block as it is."""
    if not is_object_store(path):
        yield
        return
    _probe_endpoint(path)
    try:
        yield
    except (FileNotFoundError, PdpoError):
        raise
    except Exception as err:  # noqa: BLE001 - turned into a one-line error
        raise store_error(err, path) from None


_reached: set[str] = set()  # endpoints this process has connected to once


def _probe_endpoint(path: Any, timeout_s: float = 10.0) -> None:
    """One TCP connection to the storage endpoint (once per process), so that an unreachable one is
    reported at once (gcsfs retries a refused connection with backoff for about a minute)."""
    from urllib.parse import urlsplit

    endpoint = os.environ.get("STORAGE_EMULATOR_HOST")
    if (endpoint or "") in _reached:
        return
    url = urlsplit(endpoint if endpoint and "://" in endpoint else f"http://{endpoint}" if endpoint
                  else "https://storage.googleapis.com")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
        _reached.add(endpoint or "")
    except OSError as err:
        to = f"the storage emulator at {endpoint} (STORAGE_EMULATOR_HOST)" if endpoint else f"Cloud Storage ({url.hostname})"
        raise ObjectStoreError(f"{os.fspath(path)}: cannot reach {to}: {err.strerror or err}") from None


def check_bucket(path: Any) -> None:
    """Raises ObjectStoreError unless the bucket of a gs:// `path` exists and answers: the check
    a stage makes before it writes anything there, so bad input fails in one line at once."""
    if not is_object_store(path):
        return
    bucket, _ = _object_name(path)
    if not bucket:
        raise ObjectStoreError(f"{os.fspath(path)}: a gs:// path needs a bucket name (gs://BUCKET/folder)")
    _probe_endpoint(path)
    fs = filesystem()
    try:
        fs.info(bucket)
    except FileNotFoundError:
        raise ObjectStoreError(f"{os.fspath(path)}: the bucket gs://{bucket} does not exist "
                               "(create it with `gcloud storage buckets create gs://" + bucket + "`)") from None
    except ObjectStoreError:
        raise
    except Exception as err:  # noqa: BLE001
        raise store_error(err, path) from None


def local_copy(url: Any, cache_root: Path, skip: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> Path:
    """A copy of the gs:// folder `url` under `cache_root/<bucket>/<path>`, made or brought up to
    date object by object, each verified by size and MD5 (CRC32C for composite objects) against
    what the store reports; files the folder no longer has are deleted. Returns the local folder.

    Several processes of one host may call it at once: each writes to a temporary name and renames
    into place, and they download the same bytes."""
    import tempfile

    bucket, key = _object_name(url)
    prefix = f"{bucket}/{key}".rstrip("/")
    fs = filesystem()
    try:
        listing = fs.find(prefix, detail=True)
    except Exception as err:  # noqa: BLE001
        raise store_error(err, url) from None
    if only:
        listing = {name: info for name, info in listing.items() if name[len(prefix) + 1:] in only}
    if not listing:
        missing = f"{os.fspath(url).rstrip('/')}/{only[0]}" if only else os.fspath(url)
        raise ObjectStoreError(f"{missing}: no such object" + ("" if only else " (nothing under this folder)"))
    target = cache_root / bucket / key
    wanted = set()
    for name, info in sorted(listing.items()):
        relative = name[len(prefix) + 1:]
        if not relative or relative in skip or (only and relative not in only):
            continue
        wanted.add(relative)
        local = target / relative

        def matches(path: Path) -> bool:
            if not path.is_file() or path.stat().st_size != int(info["size"]):
                return False
            if info.get("md5Hash"):
                return _encoded_checksum(path, hashlib.md5()) == info["md5Hash"]
            if info.get("crc32c"):
                import google_crc32c

                return _encoded_checksum(path, google_crc32c.Checksum()) == info["crc32c"]
            return True

        if matches(local):
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".download", dir=local.parent)
        os.close(fd)
        try:
            fs.get_file(name, tmp)
            if not matches(Path(tmp)):
                raise ObjectStoreError(f"gs://{name}: the downloaded copy does not match the object's size "
                                       "and checksum (was it replaced meanwhile? run again)")
            os.replace(tmp, local)
        except ObjectStoreError:
            raise
        except Exception as err:  # noqa: BLE001
            raise store_error(err, f"gs://{name}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
    for path in [] if only else sorted(target.rglob("*"), reverse=True):
        relative = path.relative_to(target).as_posix()
        if path.is_file() and relative not in wanted and not path.name.endswith(".download"):
            path.unlink(missing_ok=True)
    return target


def local_file(url: Any, cache_root: Path | None = None) -> Path:
    """This host's verified copy of one gs:// object (under `cache_root`, by default
    `default_gcs_cache()`), for readers that need a local file."""
    text = os.fspath(url)
    folder, _, name = text.rpartition("/")
    return local_copy(folder, cache_root or default_gcs_cache(), only=(name,)) / name


GCS_CACHE_ENV = "PDPO_GCS_CACHE_DIR"


def default_gcs_cache() -> Path:
    """Where this host keeps its copies of gs:// models and files: `$PDPO_GCS_CACHE_DIR`, else
    `$PDPO_CACHE_DIR/gcs`, else `$XDG_CACHE_HOME/pdpo_jax/gcs`, else `~/.cache/pdpo_jax/gcs`."""
    if os.environ.get(GCS_CACHE_ENV):
        return Path(os.environ[GCS_CACHE_ENV]).expanduser()
    return default_cache_root() / "gcs"


def _encoded_checksum(path: Path, checksum: Any) -> str:
    """`checksum` (hashlib's md5 or a crc32c Checksum) of the file at `path`, base64 as GCS lists it."""
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            checksum.update(block)
    return base64.b64encode(checksum.digest()).decode()
