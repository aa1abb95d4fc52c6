"""The run directory's lock on `gs://`, where there is no flock: an object created only if absent
(the store's generation precondition), a heartbeat, a second launch refused naming the first, a
killed holder of this host taken over, and a stale one reported with the command that clears it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gcs_fixtures import gcs_bucket, gcs_emulator, gcs_env  # noqa: F401 - fixtures
from pdpo_jax import cli, run_lock
from pdpo_jax.object_store import create_if_absent, filesystem, read_with_generation
from pdpo_jax.run_lock import RunDirBusy, run_dir_lock

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from pdpo_jax import run_lock
run_lock.HEARTBEAT_S = 0.2
with run_lock.run_dir_lock(sys.argv[1], command="pdpo sft --config first.yaml"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held_gcs_run_dir(gcs_bucket, gcs_env):
    """A gs:// run directory locked by another process until the test ends."""
    run_dir = f"{gcs_bucket}/runs/demo"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir], stdout=subprocess.PIPE, text=True, env=gcs_env)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield run_dir, holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_second_launch_on_a_gcs_run_dir_is_refused_naming_the_first(held_gcs_run_dir, capsys):
    run_dir, holder = held_gcs_run_dir
    fs = filesystem()
    before = sorted(fs.find(run_dir[5:]))
    status = cli.main(["make-prefs", "--config", str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}"])
    error = capsys.readouterr().err
    assert status == 2 and error.startswith("pdpo make-prefs: ") and error.count("\n") == 1, error
    assert f"{run_dir} is in use by pid {holder.pid}" in error and "pdpo sft --config first.yaml" in error
    assert sorted(fs.find(run_dir[5:])) == before == [f"{run_dir[5:]}/.lock"]  # nothing written beside it


def test_the_holder_renews_its_heartbeat_and_deletes_the_lock_when_done(held_gcs_run_dir):
    run_dir, holder = held_gcs_run_dir
    first = json.loads(read_with_generation(f"{run_dir}/.lock")[0])
    time.sleep(1.0)
    later = json.loads(read_with_generation(f"{run_dir}/.lock")[0])
    assert later["heartbeat"] > first["heartbeat"] and later["pid"] == holder.pid

    holder.send_signal(signal.SIGKILL)  # killed: nobody deletes the object, but this host sees it died
    holder.wait()
    with run_dir_lock(run_dir, command="the rerun") as lock:
        assert json.loads(read_with_generation(lock)[0])["command"] == "the rerun"
    assert read_with_generation(f"{run_dir}/.lock") is None


def test_a_stale_lock_of_another_host_is_reported_with_the_command_that_clears_it(gcs_bucket):
    run_dir = f"{gcs_bucket}/runs/demo"
    holder = {"pid": 4242, "host": "tpu-worker-0", "command": "pdpo pipeline", "started": "then",
              "heartbeat": time.time() - 2 * run_lock.STALE_AFTER_S}
    create_if_absent(f"{run_dir}/.lock", json.dumps(holder).encode())
    with pytest.raises(RunDirBusy, match=r"pid 4242 on tpu-worker-0 \(pdpo pipeline.*heartbeat stopped 20 min ago.*"
                                         rf"`gcloud storage rm {run_dir}/\.lock`"):
        with run_dir_lock(run_dir):
            pass
    holder["heartbeat"] = time.time()  # fresh: an ordinary refusal
    filesystem().pipe_file(f"{run_dir[5:]}/.lock", json.dumps(holder).encode())
    with pytest.raises(RunDirBusy, match=r"is in use by pid 4242 on tpu-worker-0"):
        with run_dir_lock(run_dir):
            pass


def test_of_two_racing_launches_exactly_one_gets_the_lock(gcs_bucket, gcs_env):
    run_dir = f"{gcs_bucket}/runs/race"
    script = ("import sys, time\nfrom pdpo_jax.run_lock import run_dir_lock, RunDirBusy\n"
              "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # both start together\n"
              "try:\n    with run_dir_lock(sys.argv[1]):\n        print('won', flush=True); time.sleep(3)\n"
              "except RunDirBusy:\n    print('refused', flush=True)\n")
    start_at = str(time.time() + 8)
    procs = [subprocess.Popen([sys.executable, "-c", script, run_dir, start_at], stdout=subprocess.PIPE, text=True,
                              env=gcs_env) for _ in range(2)]
    outcomes = sorted(proc.communicate(timeout=60)[0].strip() for proc in procs)
    assert outcomes == ["refused", "won"]


STOPPABLE = """
import sys, time
from pdpo_jax import run_lock
run_lock.HEARTBEAT_S = 0.2
try:
    with run_lock.run_dir_lock(sys.argv[1], command="pdpo sft --config first.yaml"):
        print("held", flush=True)
        time.sleep(60)
    print("finished", flush=True)
except run_lock.RunDirLost as err:
    print(f"stopped: {err}", flush=True)
"""


@pytest.fixture
def stoppable_holder(gcs_bucket, gcs_env):
    """A process holding a gs:// run directory for a minute, which says so if it is stopped."""
    run_dir = f"{gcs_bucket}/runs/demo"
    holder = subprocess.Popen([sys.executable, "-c", STOPPABLE, run_dir], stdout=subprocess.PIPE, text=True,
                              env=gcs_env)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield run_dir, holder
    finally:
        holder.kill()
        holder.wait()


def test_a_run_whose_lock_is_deleted_stops(stoppable_holder):
    run_dir, holder = stoppable_holder
    started = time.monotonic()
    filesystem().rm_file(f"{run_dir[5:]}/.lock")
    said = holder.stdout.readline().strip()
    assert said.startswith(f"stopped: {run_dir}: this run's lock {run_dir}/.lock was deleted while it ran"), said
    assert "\n" not in said and "rerun the same command to resume" in said
    assert holder.wait(timeout=30) == 0 and time.monotonic() - started < 20  # not after its minute of work
    assert read_with_generation(f"{run_dir}/.lock") is None  # it does not put a lock back on its way out


def test_a_run_whose_lock_is_taken_over_stops_and_leaves_the_new_holder_alone(stoppable_holder):
    run_dir, holder = stoppable_holder
    other = {"pid": 4242, "host": "tpu-worker-1", "command": "pdpo sft --config second.yaml", "started": "now",
             "heartbeat": time.time()}
    filesystem().pipe_file(f"{run_dir[5:]}/.lock", json.dumps(other).encode())  # what `gcloud storage cp` would do
    said = holder.stdout.readline().strip()
    assert said == (f"stopped: {run_dir} was taken over by pid 4242 on tpu-worker-1 (pdpo sft --config second.yaml, "
                    "started now) while this run held it; stopped so that two runs do not write into one run "
                    "directory (the other one goes on)"), said
    assert holder.wait(timeout=30) == 0
    assert json.loads(read_with_generation(f"{run_dir}/.lock")[0]) == other
