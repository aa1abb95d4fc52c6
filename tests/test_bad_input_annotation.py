"""The human-study tool under what a probe sent it: a database deleted while serving, a client that
hangs up mid-vote, a forged Host header, an oversized body, odd ports and output paths
(docs/bad-input.md, "Annotation API"). The web application is driven in this process."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import urllib.request

import pytest
from annotation_fixtures import pair_items, server_in_thread
from bad_input_fixtures import assert_refused, run_cli
from starlette.testclient import TestClient

from pdpo_jax.annotation.server import MAX_BODY_BYTES, create_app
from pdpo_jax.annotation.store import Study
from pdpo_jax.annotation.study_report import report_markdown, study_report


@pytest.fixture
def study_with_tokens(tmp_path):
    study = Study.create(tmp_path / "study.db", pair_items(3))
    tokens = {name: study.add_annotator(name) for name in ("alice", "bob", "carol", "dave")}
    return study, tokens


def test_a_database_deleted_while_serving_gets_503_and_is_not_recreated_empty(study_with_tokens, caplog):
    study, tokens = study_with_tokens
    client = TestClient(create_app(study), raise_server_exceptions=False)
    link = f"/a/{tokens['alice']}"
    assert client.post(f"{link}/api/items/1/vote", json={"choice": "1"}).status_code == 200
    saved = study.path.read_bytes()
    for suffix in ("", "-wal", "-shm"):
        study.path.with_name(study.path.name + suffix).unlink(missing_ok=True)
    with caplog.at_level(logging.INFO):
        for method, path in [("get", "/"), ("get", "/api/state"), ("get", "/api/items/2"), ("post", "/api/items/2/vote")]:
            answer = client.request(method.upper(), link + path, json={"choice": "2"} if method == "post" else None)
            assert answer.status_code == 503, (path, answer.text)
            assert "unavailable" in answer.json()["error"]
    assert not study.path.exists()  # no empty database behind the server's back
    assert not any(record.exc_info for record in caplog.records)
    assert any("the study database is gone" in record.getMessage() for record in caplog.records)

    study.path.write_bytes(saved)  # put back: serving goes on, the vote before the loss is there
    assert client.get(f"{link}/api/state").json()["done"] == 1
    assert client.post(f"{link}/api/items/2/vote", json={"choice": "2"}).status_code == 200
    assert [v.annotator for v in Study(study.path).votes()] == ["alice", "alice"]


def test_a_database_replaced_by_junk_gets_503(study_with_tokens):
    study, tokens = study_with_tokens
    client = TestClient(create_app(study), raise_server_exceptions=False)
    for suffix in ("-wal", "-shm"):
        study.path.with_name(study.path.name + suffix).unlink(missing_ok=True)
    study.path.write_bytes(b"not a database at all" * 100)
    assert client.get(f"/a/{tokens['alice']}/api/state").status_code == 503


def test_a_client_that_hangs_up_mid_vote_costs_one_quiet_line(study_with_tokens, caplog):
    study, tokens = study_with_tokens
    app = create_app(study)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": f"/a/{tokens['alice']}/api/items/1/vote", "raw_path": b"", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"15")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    sent = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(app(scope, receive, send))
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert sum("hung up" in record.getMessage() for record in caplog.records) == 1
    assert study.votes(history=True) == []


def test_no_redirect_is_built_from_the_host_header(study_with_tokens):
    study, tokens = study_with_tokens
    client = TestClient(create_app(study), base_url="http://evil.example")
    for path in (f"/a/{tokens['alice']}/api/state/", f"/a/{tokens['alice']}/page.js/"):
        answer = client.get(path, follow_redirects=False, headers={"host": "evil.example"})
        assert "evil.example" not in answer.headers.get("location", ""), answer.headers
        assert answer.status_code == 404 and "error" in answer.json()


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_a_body_over_the_limit_gets_a_json_413(study_with_tokens, content_type):
    study, tokens = study_with_tokens
    client = TestClient(create_app(study))
    body = b'{"choice": "1"}' + b" " * (MAX_BODY_BYTES + 1)
    answer = client.post(f"/a/{tokens['alice']}/api/items/1/vote", content=body,
                         headers={"content-type": content_type, "content-length": str(len(body))})
    assert answer.status_code == 413
    assert str(MAX_BODY_BYTES) in answer.json()["error"]
    assert study.votes() == []


def test_the_report_says_how_many_of_the_annotators_voted(study_with_tokens):
    study, tokens = study_with_tokens
    client = TestClient(create_app(study))
    for name in ("alice", "bob"):
        assert client.post(f"/a/{tokens[name]}/api/items/1/vote", json={"choice": "draw"}).status_code == 200
    report = study_report(study)
    assert (report["study"]["annotators"], report["study"]["annotators_voted"]) == (4, 2)
    assert "voted on by 2 of 4 annotators" in report_markdown(report)


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_port_out_of_range_is_one_line(port, study_with_tokens, capsys):
    study, _ = study_with_tokens
    status, error, _ = run_cli(["annotate", "serve", "--db", str(study.path), "--port", port], capsys)
    assert_refused(status, error, "annotate", "port")


@pytest.mark.parametrize("command", [["export"], ["report"]])
def test_an_output_folder_is_named_not_a_temporary_file(command, study_with_tokens, tmp_path, capsys):
    study, _ = study_with_tokens
    folder = tmp_path / "outdir"
    folder.mkdir()
    status, error, _ = run_cli(["annotate", *command, "--db", str(study.path), "--out", str(folder)], capsys)
    assert_refused(status, error, "annotate", f"{folder}: is a folder")
    assert ".tmp" not in error


def test_a_client_that_hangs_up_mid_vote_on_a_live_server_logs_no_traceback(study_with_tokens):
    """The same over a real socket: uvicorn used to log a 64-line ClientDisconnect traceback at ERROR."""
    study, tokens = study_with_tokens
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    watched = [logging.getLogger(name) for name in ("uvicorn.error", "pdpo_jax.annotation.server")]
    levels = [logger.level for logger in watched]
    try:
        with server_in_thread(study) as base:
            for logger in watched:  # once uvicorn has set up its loggers, which drops their handlers
                logger.addHandler(handler)
            watched[1].setLevel(logging.INFO)
            host, port = base.removeprefix("http://").split(":")
            request = (f"POST /a/{tokens['alice']}/api/items/1/vote HTTP/1.1\r\nHost: {host}\r\n"
                       "Content-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"cho").encode()
            with socket.create_connection((host, int(port)), timeout=10) as client:
                client.sendall(request)
            deadline = time.monotonic() + 10
            while not records and time.monotonic() < deadline:  # the server's word on the hang-up
                time.sleep(0.02)
            answer = urllib.request.urlopen(f"{base}/a/{tokens['alice']}/api/state", timeout=10)
            assert json.loads(answer.read())["done"] == 0  # still serving; nothing stored
    finally:
        for logger, level in zip(watched, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
    assert not [record.getMessage() for record in records if record.levelno >= logging.WARNING or record.exc_info]
    assert ["hung up" in record.getMessage() for record in records] == [True]
