"""A run directory holds one command at a time: a second one started from another shell is refused
at once with the holder's pid, host and command, and the lock goes when the holder exits."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pdpo_jax import cli
from pdpo_jax.run_lock import LOCK_FILE, RunDirBusy, run_dir_lock

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from pdpo_jax.run_lock import run_dir_lock
with run_dir_lock(sys.argv[1], command="pdpo sft --config first.yaml"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held_run_dir(tmp_path, subprocess_env):
    """A run directory locked by another process until the test ends."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield run_dir, holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_second_command_on_a_held_run_dir_is_refused_with_the_holder(held_run_dir, capsys):
    run_dir, holder = held_run_dir
    before = sorted(p.name for p in run_dir.iterdir())
    status = cli.main(["make-prefs", "--config", str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}"])
    error = capsys.readouterr().err
    assert status == 2 and error.startswith("pdpo make-prefs: ") and error.count("\n") == 1, error
    assert f"pid {holder.pid}" in error and "pdpo sft --config first.yaml" in error and str(run_dir) in error
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written beside the first run


def test_the_lock_goes_with_its_holder_even_when_it_is_killed(held_run_dir):
    run_dir, holder = held_run_dir
    with pytest.raises(RunDirBusy):
        with run_dir_lock(run_dir):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_dir_lock(run_dir, command="second") as lock:
        assert '"command": "second"' in lock.read_text()


def test_one_process_may_claim_its_own_run_dir_again(tmp_path):
    with run_dir_lock(tmp_path / "run"):
        with run_dir_lock(tmp_path / "run"):  # the pipeline holds it while its stages run
            pass
    assert (tmp_path / "run" / LOCK_FILE).exists()
