"""Bad gs:// input stops a command in one line, `pdpo <stage>: <what and where>`, exit status 2, with
nothing written: no credentials (a local stub that refuses every request as Cloud Storage does, 401
or 403), a bucket that does not exist, an object that does not, an endpoint nothing listens on.
Nothing here reaches a real cloud: the commands run with STORAGE_EMULATOR_HOST pointed at the stub,
the emulator or a closed loopback port.

Cost: eight short `pdpo` processes (no model is loaded), about 50 s on a busy 2-core machine.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gcs_fixtures import gcs_bucket, gcs_emulator, gcs_env  # noqa: F401 - fixtures
from pdpo_jax import cli
from pdpo_jax.object_store import filesystem

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(REPO / "configs" / "demo.yaml")


class RefusingStorage:
    """An HTTP server on 127.0.0.1 that answers every request with `status` and the JSON error body
    Cloud Storage sends a caller without credentials; it records the requests it was sent."""

    def __init__(self, status: int):
        self.requests: list[tuple[str, str]] = []
        refusing = self
        body = json.dumps({"error": {"code": status, "message": "Anonymous caller does not have storage.buckets.get "
                                                                 "access to the Google Cloud Storage bucket."}}).encode()

        class Handler(BaseHTTPRequestHandler):
            def _refuse(self) -> None:
                refusing.requests.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _refuse  # noqa: N815

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # polled every 10 ms: shutdown() waits up to one poll interval (0.5 s by default) at every stop
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def __enter__(self) -> "RefusingStorage":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pdpo(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdpo_jax.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def assert_one_line(result: subprocess.CompletedProcess, stage: str, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"pdpo {stage}: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("status", [401, 403])
def test_no_credentials_is_one_line_saying_how_to_sign_in(status, gcs_env, tmp_path):
    with RefusingStorage(status) as storage:
        env = {**gcs_env, "STORAGE_EMULATOR_HOST": storage.url}
        run = pdpo(["make-prefs", "--config", DEMO_CONFIG, "run_dir=gs://private/runs/demo"], env, tmp_path)
        assert_one_line(run, "make-prefs", "gs://private/runs/demo: no access to gs://private",
                        "gcloud auth application-default login")
        read = pdpo(["data", "inspect", "gs://private/data/dialogues.txt"], env, tmp_path)
        assert_one_line(read, "data", "gs://private/data/dialogues.txt: no access to gs://private")
    assert {method for method, _ in storage.requests} == {"GET"}  # nothing was even tried to be written
    assert list(tmp_path.iterdir()) == []  # and nothing on local disk (no folder "gs:")


def test_an_unreachable_endpoint_is_one_line_naming_it(gcs_env, tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = {**gcs_env, "STORAGE_EMULATOR_HOST": endpoint}
    run = pdpo(["make-prefs", "--config", DEMO_CONFIG, "run_dir=gs://bucket/runs/demo"], env, tmp_path)
    assert_one_line(run, "make-prefs", f"gs://bucket/runs/demo: cannot reach the storage emulator at {endpoint}")
    read = pdpo(["results", "--model", "sft=gs://bucket/eval/dnli.json", "--out", str(tmp_path / "out")], env, tmp_path)
    assert_one_line(read, "results", f"gs://bucket/eval/dnli.json: cannot reach the storage emulator at {endpoint}")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_bucket_is_named_for_inputs_and_outputs(gcs_emulator, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["data", "inspect", "gs://no-such-bucket/data/dialogues.txt"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(
        "pdpo data: gs://no-such-bucket/data/dialogues.txt: the bucket gs://no-such-bucket does not exist"), error

    conversations = tmp_path / "talks.jsonl"
    conversations.write_text(json.dumps({"id": "c0", "persona": ["i like tea ."], "history": ["hi"]}) + "\n")
    responses = tmp_path / "sft.jsonl"
    responses.write_text(json.dumps({"id": "c0", "response": "hello"}) + "\n")
    status = cli.main(["results", "--conversations", str(conversations), "--responses", f"SFT={responses}",
                       "--out", "gs://no-such-bucket/results"])
    error = capsys.readouterr().err
    assert status == 2 and error.count("\n") == 1, error
    assert error.startswith("pdpo results: gs://no-such-bucket/results/examples.md: not found (does the bucket "
                            "gs://no-such-bucket exist?)"), error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.jsonl", "talks.jsonl"]


def test_a_missing_object_is_named(gcs_bucket, tmp_path, capsys):
    cases = {
        "data": (["data", "inspect", f"{gcs_bucket}/data/none.txt"], f"no such object: {gcs_bucket}/data/none.txt"),
        "results": (["results", "--model", f"sft={gcs_bucket}/eval/dnli.json", "--out", f"{gcs_bucket}/results"],
                    f"{gcs_bucket}/eval/dnli.json: DNLI report not found (model 'sft')"),
        "judge": (["judge", "--responses", f"{gcs_bucket}/a.jsonl", f"{gcs_bucket}/b.jsonl", "--judge-model", "j",
                   "--out", f"{gcs_bucket}/judge"], f"{gcs_bucket}/a.jsonl: responses file not found"),
        "annotate": (["annotate", "init", "--db", str(tmp_path / "study.db"), "--pairs", f"{gcs_bucket}/judge"],
                     f"{gcs_bucket}/judge: not a judge output folder"),
    }
    for stage, (argv, message) in cases.items():
        assert cli.main(argv) == 2, stage
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith(f"pdpo {stage}: {message}"), error
    assert filesystem().find(gcs_bucket[5:]) == []  # no output object was started
