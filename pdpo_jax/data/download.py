"""Fetching, verifying and unpacking the public data sets (`pdpo data download`).

    pdpo data download --out data                          # PersonaChat (ConvAI2) + DNLI evaluation set
    pdpo data download --out data --from-archive convai2_fix_723.tgz     # a file fetched by hand
    pdpo data download --out data --what jpersonachat --accept-ntt-license

Layout written under --out (the paths the configs in configs/paper/ read):

    personachat/   every *.txt file of ParlAI's ConvAI2 archive (train/valid, self/both,
                   original/revised, with and without candidates)
    dnli/          every *.jsonl file of dialogue_nli_evaluation.zip (<split>_attributes.jsonl,
                   <split>_havenot.jsonl, <split>_likedislike.jsonl; valid at least)
    jpersonachat/  japanese_persona_chat.xlsx
    .downloads/    the archives as fetched (reused by a later run, removed by nothing)

Files are taken out of an archive by their base name, whatever folder they sit in inside it, so
the layout does not depend on how an archive was packed. A download is streamed to a temporary
file and renamed into place only once complete (and, where its digest is known, verified); an
interrupted download leaves nothing behind. Extracted files go to a folder built beside the
target, are checked against the digests we know, and only then replace the target whole, with a
MANIFEST.json of what came from where.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field, replace
from http.cookiejar import CookieJar
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator, Sequence

from pdpo_jax.errors import RunFailed, UsageError
from pdpo_jax.object_store import ObjectStoreError, as_path, is_object_store, local_file, upload_file
from pdpo_jax.storage import atomic_write_json, commit_directory, is_committed, umask_file_mode

CHUNK = 1 << 16
DOWNLOADS_DIR = ".downloads"
MANIFEST = "MANIFEST.json"
USER_AGENT = "pdpo-jax-data-download"


class DownloadError(RunFailed):
    """A data set could not be fetched, verified or unpacked; the message says what to do."""


class ChecksumError(DownloadError):
    def __init__(self, path: str | Path, algorithm: str, expected: str, actual: str):
        self.path, self.algorithm, self.expected, self.actual = str(path), algorithm, expected, actual
        super().__init__(f"{path}: {algorithm} digest {actual} does not match the expected {expected}")


@dataclass(frozen=True)
class Digest:
    algorithm: str  # a hashlib name
    hex: str


@dataclass(frozen=True)
class Source:
    """One data set: where it comes from and what we know about its bytes."""

    name: str
    url: str
    archive_name: str
    archive_digest: Digest | None
    kind: str  # "tar", "zip" or "file" (stored as downloaded)
    keep_suffixes: tuple[str, ...] = ()  # members kept from an archive
    required: tuple[str, ...] = ()  # base names an archive must contain
    file_digests: dict[str, Digest] = field(default_factory=dict)  # base name -> digest of the extracted file
    browser_url: str = ""  # where a person fetches it by hand, if not `url`
    license_note: str = ""  # a licence the user must accept before an automatic download


SHA256 = "sha256"

SOURCES: dict[str, Source] = {
    source.name: source
    for source in (
        # ParlAI's ConvAI2 release (parlai/tasks/convai2/build.py gives the URL and archive digest).
        Source(
            name="personachat",
            url="http://parl.ai/downloads/convai2/convai2_fix_723.tgz",
            archive_name="convai2_fix_723.tgz",
            archive_digest=Digest(SHA256, "d0ae89defe2fd0b0a4221eaa642a457d7d40cef475f54798119c7f3b8dd9361d"),
            kind="tar",
            keep_suffixes=(".txt",),
            required=("train_self_original.txt", "valid_self_original.txt"),
            file_digests={
                "valid_self_original_no_cands.txt": Digest(SHA256, "7e26e8a266583dfe21fd2df4c651a2831dceeb7c87be9c7bb517974d9979c363"),
                # md5 of the git-annex key of the same file in the datasets-mila ConvAI2 mirror
                "train_self_original_no_cands.txt": Digest("md5", "9a4125d39515b1251a5603773ebb7917"),
            },
        ),
        # The Dialogue NLI evaluation set is distributed from Google Drive; the file id is the one
        # the DNLI-based ParlAI task builds use (e.g. skywalker023/pragmatic-consistency,
        # tasks/build.py). No digest of the archive is published.
        Source(
            name="dnli",
            url="https://docs.google.com/uc?export=download&id=1sllq30KMJzEVQ4C0-a9ShSLSPIZc3iMi",
            archive_name="dialogue_nli_evaluation.zip",
            archive_digest=None,
            kind="zip",
            keep_suffixes=(".jsonl",),
            required=("valid_attributes.jsonl", "valid_havenot.jsonl", "valid_likedislike.jsonl"),
            file_digests={
                "valid_havenot.jsonl": Digest(SHA256, "6243f5dbfafe9ea05913374accbff0bb467b361dc218c219234e0c11d4da7269"),
                "valid_likedislike.jsonl": Digest(SHA256, "ca79ce3b521246d8ac288b36d2e996dd902b150a6d93eac20779032e5478bc83"),
            },
            browser_url="the Dialogue NLI project page, wellecks.com/dialogue_nli",
        ),
        # JPersonaChat: one workbook, linked from the README of nttcslab/japanese-dialog-transformers
        # (`?dl=1` asks Dropbox for the file instead of its web page).
        Source(
            name="jpersonachat",
            url="https://www.dropbox.com/s/sda9wzexh7ntlij/japanese_persona_chat.xlsx?dl=1",
            archive_name="japanese_persona_chat.xlsx",
            archive_digest=None,
            kind="file",
            browser_url="https://github.com/nttcslab/japanese-dialog-transformers (README, 'JPersonaChat')",
            license_note=(
                "JPersonaChat is released by NTT under its Dialogue Model and Data Evaluation License "
                "(LICENSE.md of nttcslab/japanese-dialog-transformers), which allows evaluation and "
                "verification use only and forbids redistribution"
            ),
        ),
    )
}
DEFAULT_WHAT = ("personachat", "dnli")


# ----------------------------------------------------------------------------- digests


def file_digest(path: str | Path, algorithm: str = SHA256) -> str:
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def verify_file(path: str | Path, digest: Digest, shown_as: str | Path | None = None) -> None:
    actual = file_digest(path, digest.algorithm)
    if actual != digest.hex.lower():
        raise ChecksumError(shown_as or path, digest.algorithm, digest.hex.lower(), actual)


# ----------------------------------------------------------------------------- fetching


def _progress_bar(total: int | None, label: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                file=sys.stderr, leave=False)


class _Opener:
    """urllib with cookies (Google Drive's confirmation round trip needs them) and our user agent."""

    def __init__(self) -> None:
        self.cookies = CookieJar()
        self._opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))

    def open(self, url: str, timeout_s: float):
        return self._opener.open(urllib.request.Request(url, headers={"User-Agent": USER_AGENT}), timeout=timeout_s)


def _is_google_drive(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    return host.endswith(("docs.google.com", "drive.google.com"))


def _drive_confirm_url(url: str, page: str, cookies: CookieJar) -> str | None:
    """Large Drive files answer with a 'cannot scan for viruses' page first; the real download
    needs its confirmation token (a `download_warning*` cookie, or a `confirm` field of the page)."""
    token = next((c.value for c in cookies if c.name.startswith("download_warning")), None)
    if token is None:
        found = re.search(r'confirm=([0-9A-Za-z_\-]+)', page) or re.search(r'name="confirm"\s+value="([^"]+)"', page)
        token = found.group(1) if found else None
    if token is None:
        return None
    parts = urllib.parse.urlparse(url)
    query = dict(urllib.parse.parse_qsl(parts.query)) | {"confirm": token}
    return urllib.parse.urlunparse(parts._replace(query=urllib.parse.urlencode(query)))


def _open_download(url: str, timeout_s: float):
    opener = _Opener()
    response = opener.open(url, timeout_s)
    if "text/html" in (response.headers.get("Content-Type") or "") and _is_google_drive(url):
        page = response.read(1 << 20).decode("utf-8", "replace")
        response.close()
        confirmed = _drive_confirm_url(url, page, opener.cookies)
        if confirmed is not None:
            response = opener.open(confirmed, timeout_s)
    if "text/html" in (response.headers.get("Content-Type") or ""):
        response.close()
        raise DownloadError(f"{url} answered with a web page instead of the file (a sign-in, quota or "
                            f"confirmation page)")
    return response


def _stream_to(response, handle: BinaryIO, hasher, label: str, progress: bool) -> int:
    length = response.headers.get("Content-Length")
    expected = int(length) if length and length.isdigit() else None
    received = 0
    with _progress_bar(expected, label, progress) as bar:
        for chunk in iter(lambda: response.read(CHUNK), b""):
            handle.write(chunk)
            hasher.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    # http.client returns a short body without an error when the peer closes early
    if expected is not None and received != expected:
        raise http.client.IncompleteRead(b"", expected - received)
    return received


def download(url: str, dest: str | Path, *, digest: Digest | None = None, retries: int = 3, backoff_s: float = 2.0,
             timeout_s: float = 60.0, progress: bool = True) -> Path:
    """Streams `url` to `dest` through a temporary file in the same folder, renamed into place only
    when complete and (with `digest`) verified. Connection failures and short reads are retried
    `retries` times in all, with a growing pause; HTTP errors and digest mismatches are not. A gs://
    `dest` is downloaded to a local temporary folder first, then uploaded as one object."""
    if is_object_store(dest):
        with tempfile.TemporaryDirectory(prefix="pdpo-download-") as local:
            fetched = download(url, Path(local) / as_path(dest).name, digest=digest, retries=retries,
                               backoff_s=backoff_s, timeout_s=timeout_s, progress=progress)
            upload_file(fetched, dest)
        return as_path(dest)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for attempt in range(max(1, retries)):
        if attempt:
            time.sleep(backoff_s * attempt)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            os.fchmod(fd, umask_file_mode())
            hasher = hashlib.new(digest.algorithm if digest else SHA256)
            with os.fdopen(fd, "wb") as handle:
                with _open_download(url, timeout_s) as response:
                    _stream_to(response, handle, hasher, dest.name, progress)
                handle.flush()
                os.fsync(handle.fileno())
            if digest is not None and hasher.hexdigest() != digest.hex.lower():
                raise ChecksumError(f"{dest.name} downloaded from {url}", digest.algorithm, digest.hex.lower(),
                                    hasher.hexdigest())
            os.replace(tmp, dest)
            return dest
        except urllib.error.HTTPError as err:
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets, short reads
            last_error = err
        finally:
            tmp.unlink(missing_ok=True)
    reason = getattr(last_error, "reason", None) or last_error
    raise DownloadError(f"could not download {url} after {max(1, retries)} attempt(s): {reason}")


# ----------------------------------------------------------------------------- unpacking


def _safe_member_name(name: str, archive: Path) -> PurePosixPath:
    """The member's path inside the archive, refusing anything that could land outside the target
    (absolute paths, drive letters, `..` components)."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", name):
        raise DownloadError(f"{archive}: refusing unsafe member path {name!r} (absolute or leading outside the "
                            f"target folder)")
    return path


def _is_clutter(path: PurePosixPath) -> bool:
    return "__MACOSX" in path.parts or path.name.startswith("._") or path.name.startswith(".")


def _tar_members(archive: Path) -> Iterator[tuple[PurePosixPath, BinaryIO]]:
    try:
        tar = tarfile.open(archive, "r:*")
    except tarfile.TarError as err:
        raise DownloadError(f"{archive}: not a readable tar archive ({err})") from None
    with tar:
        for member in tar:
            path = _safe_member_name(member.name, archive)
            if member.issym() or member.islnk():
                raise DownloadError(f"{archive}: refusing link member {member.name!r} -> {member.linkname!r}")
            if member.isdir():
                continue
            if not member.isfile():
                raise DownloadError(f"{archive}: refusing special member {member.name!r} (device or fifo)")
            handle = tar.extractfile(member)
            assert handle is not None
            with handle:
                yield path, handle


def _zip_members(archive: Path) -> Iterator[tuple[PurePosixPath, BinaryIO]]:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise DownloadError(f"{archive}: not a readable zip archive ({err})") from None
    with zf:
        for info in zf.infolist():
            path = _safe_member_name(info.filename, archive)
            if info.is_dir():
                continue
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise DownloadError(f"{archive}: refusing symbolic link member {info.filename!r}")
            with zf.open(info) as handle:
                yield path, handle


def _members(archive: Path, kind: str) -> Iterator[tuple[PurePosixPath, BinaryIO]]:
    return _tar_members(archive) if kind == "tar" else _zip_members(archive)


def _check_names(archive: Path, kind: str) -> None:
    """Refuses an archive with any unsafe member before a single byte is written."""
    if kind == "tar":
        try:
            with tarfile.open(archive, "r:*") as tar:
                names = tar.getnames()
        except tarfile.TarError as err:
            raise DownloadError(f"{archive}: not a readable tar archive ({err})") from None
    else:
        try:
            with zipfile.ZipFile(archive) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise DownloadError(f"{archive}: not a readable zip archive ({err})") from None
    for name in names:
        _safe_member_name(name, archive)


def _stage_members(archive: Path, source: Source, staging: Path) -> dict[str, dict[str, str]]:
    """Copies the kept members into `staging` by base name; returns {name: {member, sha256}}."""
    entries: dict[str, dict[str, str]] = {}
    for path, handle in _members(archive, source.kind):
        if _is_clutter(path) or not path.name.endswith(source.keep_suffixes):
            continue
        if path.name in entries:
            raise DownloadError(f"{archive}: two members are named {path.name!r} "
                                f"({entries[path.name]['member']} and {path})")
        hasher = hashlib.sha256()
        with open(staging / path.name, "wb") as out:
            for chunk in iter(lambda: handle.read(CHUNK), b""):
                out.write(chunk)
                hasher.update(chunk)
        entries[path.name] = {"member": str(path), "sha256": hasher.hexdigest()}
    return entries


def _verify_staged(archive: Path, source: Source, staging: Path, entries: dict[str, dict[str, str]]) -> None:
    if not entries:
        raise DownloadError(f"{archive}: holds no {'/'.join(source.keep_suffixes)} file; is it the {source.name} "
                            f"archive ({source.archive_name})?")
    missing = [name for name in source.required if name not in entries]
    if missing:
        raise DownloadError(f"{archive}: missing {', '.join(missing)}; is it the {source.name} archive "
                            f"({source.archive_name})?")
    for name, digest in source.file_digests.items():
        if name in entries:
            verify_file(staging / name, digest, shown_as=f"{name} (member {entries[name]['member']} of {archive})")


def install_from_archive(archive: str | Path, source: Source, out_dir: str | Path) -> Path:
    """Unpacks (or for a plain file, copies) `archive` into `out_dir/<source.name>/`.

    The folder is built beside the target and swapped in whole (`pdpo_jax.storage.commit_directory`)
    once every file is in hand and matches the digests we know; until then the target is as it was.
    """
    archive, out_dir = _local_archive(archive), as_path(out_dir)
    target = out_dir / source.name
    if source.kind != "file":
        _check_names(archive, source.kind)
    with commit_directory(target, local_staging=True) as staging:
        if source.kind == "file":
            shutil.copyfile(archive, staging / source.archive_name)
            entries = {source.archive_name: {"member": archive.name, "sha256": file_digest(archive)}}
        else:
            entries = _stage_members(archive, source, staging)
            _verify_staged(archive, source, staging, entries)
        atomic_write_json(staging / MANIFEST, {
            "source": source.name, "url": source.url, "archive": archive.name,
            "archive_sha256": file_digest(archive), "files": entries,
        })
    return target


def _local_archive(archive: str | Path) -> Path:
    """`archive` as a local file (a gs:// one as this host's verified copy of it)."""
    if is_object_store(archive):
        try:
            return local_file(archive)
        except ObjectStoreError as err:
            raise DownloadError(str(err)) from None
    archive = Path(archive)
    if not archive.is_file():
        raise DownloadError(f"{archive}: no such file")
    return archive


def is_installed(target: Path) -> bool:
    if is_object_store(target) and not is_committed(target):
        return False  # on gs://, objects without the COMMITTED marker are an unfinished install
    manifest = target / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError):
        return False
    return all((target / name).is_file() for name in files)


# ----------------------------------------------------------------------------- one data set


def manual_instructions(source: Source, out_dir: Path) -> str:
    where = f"{source.url}" + (f"\n    (or from {source.browser_url})" if source.browser_url else "")
    return (f"To install {source.name} by hand: on a machine with internet access download\n    {where}\n"
            f"save it as {source.archive_name}, copy it here and run\n"
            f"    pdpo data download --out {out_dir} --what {source.name} --from-archive /path/to/{source.archive_name}")


def fetch(source: Source, out_dir: str | Path, *, from_archive: str | Path | None = None, force: bool = False,
          accept_license: bool = False, retries: int = 3, timeout_s: float = 60.0, progress: bool = True,
          log=print) -> Path:
    """Installs one data set under `out_dir/<name>/`: from `from_archive` if given, else from the
    cached archive in `out_dir/.downloads/`, else by downloading it."""
    out_dir = as_path(out_dir)
    target = out_dir / source.name
    if from_archive is None and not force and is_installed(target):
        log(f"{source.name}: already in {target} (use --force to fetch it again)")
        return target
    if from_archive is not None:
        archive = _local_archive(from_archive)
        if source.archive_digest is not None:
            verify_file(archive, source.archive_digest)
    else:
        archive = out_dir / DOWNLOADS_DIR / source.archive_name
        if force or not archive.is_file():
            if source.license_note and not accept_license:
                raise DownloadError(f"{source.license_note}. Read it, then rerun with --accept-ntt-license to "
                                    f"download, or fetch the file yourself.\n{manual_instructions(source, out_dir)}")
            log(f"{source.name}: downloading {source.url}")
            try:
                download(source.url, archive, digest=source.archive_digest, retries=retries, timeout_s=timeout_s,
                         progress=progress)
            except ChecksumError:
                raise
            except DownloadError as err:
                raise DownloadError(f"{err}\n{manual_instructions(source, out_dir)}") from None
        elif source.archive_digest is not None:
            verify_file(_local_archive(archive), source.archive_digest)
    log(f"{source.name}: unpacking {archive}")
    install_from_archive(archive, source, out_dir)
    log(f"{source.name}: ready in {target}")
    return target


# ----------------------------------------------------------------------------- command line


def configured_sources(url_overrides: dict[str, str], digest_overrides: dict[str, str]) -> dict[str, Source]:
    """SOURCES with --url / --archive-sha256 applied (an empty digest turns the archive check off)."""
    sources = dict(SOURCES)
    for name, url in url_overrides.items():
        sources[name] = replace(sources[name], url=url)
    for name, hex_digest in digest_overrides.items():
        hex_digest = hex_digest.strip().lower()
        if hex_digest and not re.fullmatch(r"[0-9a-f]{64}", hex_digest):
            raise UsageError(f"--archive-sha256 {name}=... is not 64 hex digits")
        sources[name] = replace(sources[name], archive_digest=Digest(SHA256, hex_digest) if hex_digest else None)
    return sources
