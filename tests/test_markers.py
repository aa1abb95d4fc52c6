"""The test tiers of tests/conftest.py: a test is marked by the fixtures it uses, and one that starts
a process, reads the bundled model or loads the TPU compiler without its fixture fails."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import FIXTURE_MARKERS, GUARD, HEAVY_MARKERS


def test_every_heavy_marker_comes_from_a_fixture(pytestconfig):
    given = {marker for markers in FIXTURE_MARKERS.values() for marker in markers}
    assert set(HEAVY_MARKERS) <= given  # a fixture may also mark what stays in the fast tier (gcs)
    registered = {line.split(":")[0] for line in pytestconfig.getini("markers")}
    assert given <= registered  # pyproject.toml describes each


def test_a_fixture_marks_the_tests_that_use_it_even_through_another_fixture(request, held_process_env):
    assert request.node.get_closest_marker("subprocess")
    assert not request.node.get_closest_marker("bundled_model")


@pytest.fixture
def held_process_env(subprocess_env):
    return subprocess_env


def test_a_process_started_without_the_fixture_fails_the_test(request):
    assert not request.node.get_closest_marker("subprocess")
    with pytest.raises(RuntimeError, match="without the `subprocess` marker: use the `subprocess_env` fixture"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    subprocess.run(["true"], check=True)  # a program a library may run (uname, fc-list) is not guarded
    assert GUARD.violations
    GUARD.violations.clear()  # the test's teardown would fail on it, as it must elsewhere


def test_reading_the_bundled_model_without_the_fixture_fails_the_test(tmp_path):
    converted = tmp_path / "smollm2-135m-instruct"
    converted.mkdir()
    with pytest.raises(RuntimeError, match="use the `bundled_gguf` fixture"):
        (converted / "config.json").write_text("{}")
    GUARD.violations.clear()
    assert GUARD.needed_marker("import", ("libtpu", None)) == "tpu_compiler"  # imported once a session: not run here
    assert GUARD.needed_marker("import", ("numpy", None)) is None
