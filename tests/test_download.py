"""`pdpo data download` against archives served from 127.0.0.1: download, verification, safe
unpacking, interrupted transfers, archives fetched by hand, and the offline message.

The archives are built in tmp dirs; the PersonaChat and DNLI files staged for the project go
inside them, so the digests the command knows for those files are checked for real.
"""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
import zipfile
from http.cookiejar import CookieJar
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pdpo_jax import cli, storage
from pdpo_jax.data import download as dl


def pdpo_data(argv):
    return cli.main(["data", *argv])

STAGED = {
    "personachat": ["valid_self_original_no_cands.txt"],
    "dnli": ["valid_havenot.jsonl", "valid_likedislike.jsonl"],
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- archives


def tar_bytes(members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        folder = tarfile.TarInfo("ConvAI2")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def personachat_members(shared_data: Path | None) -> dict[str, bytes]:
    """The staged validation file when given, else a stand-in (for tests that need any archive)."""
    staged = (shared_data / "personachat" / "valid_self_original_no_cands.txt").read_bytes() if shared_data else b""
    return {
        "ConvAI2/valid_self_original_no_cands.txt": staged,
        "ConvAI2/train_self_original.txt": b"1 your persona: i like tea.\n2 hi\thello !\n",
        "ConvAI2/valid_self_original.txt": b"1 your persona: i like cats.\n2 hey\thi there .\n",
        "ConvAI2/README.md": b"not data\n",
    }


def dnli_members(shared_data: Path) -> dict[str, bytes]:
    members = {f"dialogue_nli/{name}": (shared_data / "dnli" / name).read_bytes() for name in STAGED["dnli"]}
    members["dialogue_nli/valid_attributes.jsonl"] = b'{"persona": ["i am tall ."], "prefix": ["hi"]}\n'
    members["__MACOSX/dialogue_nli/._valid_havenot.jsonl"] = b"resource fork"
    return members


# ----------------------------------------------------------------------------- a local server


class Served:
    """Files served by path; `truncate[path] = n` cuts the next n responses off halfway."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.truncate: dict[str, int] = {}
        self.requests: list[str] = []


@pytest.fixture()
def server(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    served = Served()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            served.requests.append(self.path)
            if self.path not in served.files:
                self.send_error(404)
                return
            body, content_type = served.files[self.path]
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if served.truncate.get(self.path, 0) > 0:
                served.truncate[self.path] -= 1
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # the peer sees the transfer end early
                return
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # polled every 10 ms: shutdown() waits up to one poll interval (0.5 s by default) at every stop
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    served.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture()
def archives(shared_data, server):
    tgz = tar_bytes(personachat_members(shared_data))
    zipped = zip_bytes(dnli_members(shared_data))
    server.files["/convai2.tgz"] = (tgz, "application/x-gzip")
    server.files["/dnli.zip"] = (zipped, "application/zip")
    return {"tgz": tgz, "zip": zipped}


@pytest.fixture()
def synthetic_tgz(server) -> bytes:
    """A PersonaChat-shaped archive holding none of the files whose digests are known."""
    members = {name: data for name, data in personachat_members(None).items() if "no_cands" not in name}
    tgz = tar_bytes(members)
    server.files["/convai2.tgz"] = (tgz, "application/x-gzip")
    return tgz


def cli_args(server, out: Path, tgz: bytes, *extra: str) -> list[str]:
    return ["download", "--out", str(out), "--quiet", "--retries", "1",
            "--url", f"personachat={server.base}/convai2.tgz", "--url", f"dnli={server.base}/dnli.zip",
            "--archive-sha256", f"personachat={sha256(tgz)}", *extra]


def leftovers(folder: Path) -> list[str]:
    """Temporary files, or folders being built or set aside, anywhere under `folder`."""
    return sorted(str(p) for p in folder.rglob("*")
                  if p.name.endswith((".part", ".staging", storage.OLD_SUFFIX)) or storage.BUILDING_INFIX in p.name)


# ----------------------------------------------------------------------------- tests


def test_download_verifies_and_unpacks_both_data_sets(tmp_path, shared_data, server, archives, capsys):
    out = tmp_path / "data"
    assert pdpo_data(cli_args(server, out, archives["tgz"])) == 0

    for name, files in STAGED.items():
        for file_name in files:
            assert (out / name / file_name).read_bytes() == (shared_data / name / file_name).read_bytes()
    assert sorted(p.name for p in (out / "personachat").glob("*.txt")) == [
        "train_self_original.txt", "valid_self_original.txt", "valid_self_original_no_cands.txt"]
    assert sorted(p.name for p in (out / "dnli").glob("*")) == [
        "MANIFEST.json", "valid_attributes.jsonl", "valid_havenot.jsonl", "valid_likedislike.jsonl"]
    manifest = (out / "dnli" / "MANIFEST.json").read_text()
    assert "dialogue_nli/valid_havenot.jsonl" in manifest and dl.SOURCES["dnli"].file_digests["valid_havenot.jsonl"].hex in manifest
    assert (out / ".downloads" / "convai2_fix_723.tgz").read_bytes() == archives["tgz"]
    assert leftovers(out) == []

    requests = len(server.requests)
    assert pdpo_data(cli_args(server, out, archives["tgz"])) == 0
    assert len(server.requests) == requests  # installed: nothing fetched again
    assert "already in" in capsys.readouterr().out
    assert pdpo_data(cli_args(server, out, archives["tgz"], "--force")) == 0
    assert len(server.requests) == requests + 2


def test_a_changed_data_file_is_refused_naming_both_digests(tmp_path, shared_data, server, capsys):
    members = dnli_members(shared_data)
    members["dialogue_nli/valid_havenot.jsonl"] += b'{"persona": []}\n'
    server.files["/dnli.zip"] = (zip_bytes(members), "application/zip")
    out = tmp_path / "data"
    source = dl.configured_sources({"dnli": f"{server.base}/dnli.zip"}, {})["dnli"]
    with pytest.raises(dl.ChecksumError) as caught:
        dl.fetch(source, out, progress=False, retries=1, log=lambda _: None)
    expected = dl.SOURCES["dnli"].file_digests["valid_havenot.jsonl"].hex
    assert caught.value.expected == expected and caught.value.actual == sha256(members["dialogue_nli/valid_havenot.jsonl"])
    assert not (out / "dnli").exists() and leftovers(out) == []

    assert pdpo_data(["download", "--out", str(out), "--what", "dnli", "--quiet", "--url", f"dnli={server.base}/dnli.zip"]) == 1
    message = capsys.readouterr().err
    assert "valid_havenot.jsonl" in message and expected in message and caught.value.actual in message


def test_an_archive_with_the_wrong_digest_is_not_kept(tmp_path, server, synthetic_tgz, capsys):
    out = tmp_path / "data"
    wrong = "0" * 64
    args = ["download", "--out", str(out), "--what", "personachat", "--quiet", "--retries", "1",
            "--url", f"personachat={server.base}/convai2.tgz", "--archive-sha256", f"personachat={wrong}"]
    assert pdpo_data(args) == 1
    message = capsys.readouterr().err
    assert wrong in message and sha256(synthetic_tgz) in message
    assert not (out / ".downloads" / "convai2_fix_723.tgz").exists() and leftovers(out) == []


def test_an_interrupted_download_leaves_nothing_and_a_retry_succeeds(tmp_path, server, synthetic_tgz):
    out = tmp_path / "data"
    server.truncate["/convai2.tgz"] = 1
    source = dl.configured_sources({"personachat": f"{server.base}/convai2.tgz"},
                                   {"personachat": sha256(synthetic_tgz)})["personachat"]
    with pytest.raises(dl.DownloadError, match="IncompleteRead|could not download"):
        dl.fetch(source, out, retries=1, progress=False, log=lambda _: None)
    assert not (out / "personachat").exists()
    assert list((out / ".downloads").iterdir()) == []  # no partial archive under any name

    dl.fetch(source, out, retries=1, progress=False, log=lambda _: None)
    assert (out / "personachat" / "train_self_original.txt").is_file()
    assert server.requests.count("/convai2.tgz") == 2

    # within one call, the retry loop does the same
    server.truncate["/convai2.tgz"] = 1
    target = tmp_path / "again" / "a.tgz"
    dl.download(f"{server.base}/convai2.tgz", target, digest=dl.Digest("sha256", sha256(synthetic_tgz)),
                retries=2, backoff_s=0, progress=False)
    assert target.read_bytes() == synthetic_tgz and leftovers(target.parent) == []


@pytest.mark.parametrize("kind", ["tar", "zip", "tar-link"])
def test_members_outside_the_target_are_refused(tmp_path, kind):
    archive = tmp_path / ("evil.tgz" if kind.startswith("tar") else "evil.zip")
    if kind == "tar":
        archive.write_bytes(tar_bytes({"ConvAI2/train_self_original.txt": b"ok\n", "../evil.txt": b"pwned\n"}))
    elif kind == "tar-link":
        link = tarfile.TarInfo("ConvAI2/valid_self_original.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.write_bytes(tar_bytes({"ConvAI2/train_self_original.txt": b"ok\n"}, extra=[link]))
    else:
        archive.write_bytes(zip_bytes({"valid_havenot.jsonl": b"{}\n", "../../evil.jsonl": b"{}\n"}))
    source = dl.SOURCES["personachat" if kind.startswith("tar") else "dnli"]
    out = tmp_path / "data"
    with pytest.raises(dl.DownloadError, match="refusing"):
        dl.install_from_archive(archive, dl.configured_sources({}, {source.name: ""})[source.name], out)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "evil.jsonl").exists()
    assert not (out / source.name).exists() and leftovers(out) == []


def test_from_archive_installs_a_file_fetched_by_hand(tmp_path, shared_data, capsys):
    hand = tmp_path / "hand"
    hand.mkdir()
    (hand / "dialogue_nli_evaluation.zip").write_bytes(zip_bytes(dnli_members(shared_data)))
    out = tmp_path / "data"
    assert pdpo_data(["download", "--out", str(out), "--from-archive", str(hand / "dialogue_nli_evaluation.zip")]) == 0
    for name in STAGED["dnli"]:
        assert (out / "dnli" / name).read_bytes() == (shared_data / "dnli" / name).read_bytes()

    # the official PersonaChat name carries a known archive digest, which a repack does not match
    tgz = tar_bytes(personachat_members(shared_data))
    (hand / "convai2_fix_723.tgz").write_bytes(tgz)
    assert pdpo_data(["download", "--out", str(out), "--from-archive", str(hand / "convai2_fix_723.tgz")]) == 1
    assert not (out / "personachat").exists()
    assert pdpo_data(["download", "--out", str(out), "--from-archive", str(hand / "convai2_fix_723.tgz"),
                    "--archive-sha256", "personachat="]) == 0
    assert (out / "personachat" / "valid_self_original_no_cands.txt").read_bytes() == \
        (shared_data / "personachat" / "valid_self_original_no_cands.txt").read_bytes()

    (hand / "mine.bin").write_bytes(tgz)
    capsys.readouterr()
    assert pdpo_data(["download", "--out", str(out), "--from-archive", str(hand / "mine.bin")]) == 2
    assert "add --what NAME" in capsys.readouterr().err


def test_an_archive_missing_expected_files_is_refused(tmp_path):
    archive = tmp_path / "dialogue_nli_evaluation.zip"
    archive.write_bytes(zip_bytes({"valid_havenot.jsonl": b"{}\n"}))
    with pytest.raises(dl.DownloadError, match="missing valid_attributes.jsonl, valid_likedislike.jsonl"):
        dl.install_from_archive(archive, dl.SOURCES["dnli"], tmp_path / "data")


def test_offline_explains_how_to_fetch_by_hand(tmp_path, capsys, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as sock:  # a port nothing listens on: connection refused, as offline
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "data"
    args = ["download", "--out", str(out), "--what", "personachat", "--quiet", "--retries", "1",
            "--url", f"personachat=http://127.0.0.1:{port}/convai2_fix_723.tgz"]
    assert pdpo_data(args) == 1
    message = capsys.readouterr().err
    assert "could not download" in message and "--from-archive /path/to/convai2_fix_723.tgz" in message
    assert "--what personachat" in message and not (out / "personachat").exists()


def test_a_web_page_instead_of_the_file_is_an_error(tmp_path, server):
    server.files["/file.zip"] = (b"<html>sign in</html>", "text/html; charset=utf-8")
    with pytest.raises(dl.DownloadError, match="web page"):
        dl.download(f"{server.base}/file.zip", tmp_path / "file.zip", retries=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_google_drive_confirmation_token_is_added_to_the_url():
    url = "https://docs.google.com/uc?export=download&id=abc"
    page = '<a href="/uc?export=download&amp;confirm=t0K-en_1&amp;id=abc">Download anyway</a>'
    confirmed = dl._drive_confirm_url(url, page, CookieJar())
    assert confirmed == "https://docs.google.com/uc?export=download&id=abc&confirm=t0K-en_1"
    assert dl._drive_confirm_url(url, "<html>quota exceeded</html>", CookieJar()) is None


def test_jpersonachat_needs_the_licence_or_a_file(tmp_path, capsys):
    out = tmp_path / "data"
    assert pdpo_data(["download", "--out", str(out), "--what", "jpersonachat", "--quiet"]) == 1
    assert "--accept-ntt-license" in capsys.readouterr().err and not out.joinpath("jpersonachat").exists()
    workbook = tmp_path / "japanese_persona_chat.xlsx"
    workbook.write_bytes(zip_bytes({"xl/workbook.xml": b"<workbook/>"}))
    assert pdpo_data(["download", "--out", str(out), "--from-archive", str(workbook)]) == 0
    assert (out / "jpersonachat" / "japanese_persona_chat.xlsx").read_bytes() == workbook.read_bytes()
