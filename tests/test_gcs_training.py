"""Training whose stage folder is on `gs://` (the local GCS emulator), and preemption: a run killed
with SIGKILL resumes from the bucket to the parameters, metrics and best model of an uninterrupted
local run; SIGTERM checkpoints at the next step boundary and exits with the resume status.

Cost: five runs of tests/train_resume_script.py (a tiny Llama, 8 steps), 160 s in all on a shared
2-core machine; the uninterrupted run is shared by both tests.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gcs_fixtures import gcs_emulator, gcs_env  # noqa: F401 - fixtures
from pdpo_jax.object_store import as_path, filesystem
from pdpo_jax.storage import is_committed
from pdpo_jax.train.checkpoints import TrainCheckpointer, read_best_info
from pdpo_jax.train.loop import RESUME_EXIT_STATUS

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"tokens_per_s"}


def run_script(out_dir, cache_dir: Path, base_env: dict[str, str], **signal_after: int) -> subprocess.CompletedProcess:
    """tests/train_resume_script.py into `out_dir`; `kill=k` / `term=k` signals it as step k+1 starts."""
    env = dict(base_env, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PDPO_MODEL_DIR=str(cache_dir.parent / "model"))
    for name in ("PDPO_KILL_AFTER_STEP", "PDPO_TERM_AFTER_STEP"):
        env.pop(name, None)
    for kind, step in signal_after.items():
        env[f"PDPO_{kind.upper()}_AFTER_STEP"] = str(step)
    command = [sys.executable, str(REPO_ROOT / "tests" / "train_resume_script.py"), str(out_dir)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def metrics_lines(stage_dir) -> list[dict]:
    lines = [json.loads(line) for line in as_path(stage_dir).joinpath("metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def final_params(out_dir) -> dict[str, np.ndarray]:
    import io

    with np.load(io.BytesIO(as_path(out_dir).joinpath("final_params.npz").read_bytes())) as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, gcs_env):
    """The uninterrupted run, on local disk: what every interrupted one must end with."""
    tmp = tmp_path_factory.mktemp("straight")
    result = run_script(tmp / "run", tmp / "jax_cache", gcs_env)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run", tmp / "jax_cache"


def assert_same_as_straight(out_dir, straight: Path) -> None:
    expected, actual = final_params(straight), final_params(out_dir)
    assert sorted(expected) == sorted(actual)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    assert metrics_lines(as_path(out_dir) / "sft") == metrics_lines(straight / "sft")
    assert read_best_info(as_path(out_dir) / "sft" / "best") == read_best_info(straight / "sft" / "best")


def test_a_run_killed_on_gcs_resumes_to_the_uninterrupted_result(straight_run, gcs_emulator, gcs_env):
    straight, cache = straight_run
    out_dir = gcs_emulator.create_bucket("killed-run") + "/run"
    killed = run_script(out_dir, cache, gcs_env, kill=5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert TrainCheckpointer(f"{out_dir}/sft/checkpoints").latest_step() == 4
    assert is_committed(f"{out_dir}/sft/best")
    assert not as_path(out_dir).joinpath("final_params.npz").exists()

    resumed = run_script(out_dir, cache, gcs_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_as_straight(out_dir, straight)
    stage = out_dir[len("gs://"):] + "/sft"
    names = {key[len(stage) + 1:] for key in filesystem().find(stage)}
    assert not any(".tmp-" in name for name in names), names  # no staged copy left behind
    assert any(name.startswith("tensorboard/events.out.tfevents") for name in names), names


def test_sigterm_checkpoints_at_the_step_boundary_and_exits_with_the_resume_status(straight_run, tmp_path, gcs_env):
    straight, cache = straight_run
    out_dir = tmp_path / "run"
    stopped = run_script(out_dir, cache, gcs_env, term=2)  # arrives while step 3 runs; 3 is not a checkpoint step
    assert stopped.returncode == RESUME_EXIT_STATUS, stopped.stderr[-3000:]
    assert "stopped on SIGTERM after step 3 of 8" in stopped.stderr
    assert TrainCheckpointer(out_dir / "sft" / "checkpoints").latest_step() == 3
    assert max(line["step"] for line in metrics_lines(out_dir / "sft")) == 3

    resumed = run_script(out_dir, cache, gcs_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_as_straight(out_dir, straight)
