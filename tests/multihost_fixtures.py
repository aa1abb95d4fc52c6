"""Starting a multi-process JAX run on 127.0.0.1 for a test: every process on CPU with its own fake
devices, joined by PDPO_DISTRIBUTED=1 and the standard JAX_* variables, as tpu/launch.sh starts the
workers of a pod slice. Tests pass the `subprocess_env` fixture as the base environment."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
NUM_PROCESSES = 2
# The persistent compilation cache of tests/conftest.py, kept where every other JAX_* variable goes.
JAX_CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(base_env: dict[str, str], port: int, process_id: int, devices_per_process: int,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {key: value for key, value in base_env.items()
           if key in JAX_CACHE_VARIABLES or not key.startswith(("JAX_", "TPU_", "SLURM_", "OMPI_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        PDPO_DISTRIBUTED="1",
        PDPO_DISTRIBUTED_TIMEOUT="60",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(NUM_PROCESSES),
        JAX_PROCESS_ID=str(process_id),
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        OMP_NUM_THREADS="1",
    )
    env.update(extra or {})
    return env


def run_workers(command: list[str], log_dir: Path, *, base_env: dict[str, str], devices_per_process: int,
                stall_s: float = 60, deadline_s: float = 300, env: dict[str, str] | None = None) -> None:
    """Starts `command` as every process (`{process}` in `env` values becomes its index), and fails
    as soon as one fails, all go quiet for `stall_s` (a hung collective) or `deadline_s` passes,
    killing the rest, which would otherwise wait on a collective that never completes."""
    port = free_port()
    procs, logs = [], []
    for process_id in range(NUM_PROCESSES):
        log = open(log_dir / f"worker_{process_id}.log", "w+")
        logs.append(log)
        extra = {key: value.format(process=process_id) for key, value in (env or {}).items()}
        procs.append(subprocess.Popen(command, env=worker_env(base_env, port, process_id, devices_per_process, extra),
                                      cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT))
    start = last_progress = time.monotonic()
    sizes = [0] * NUM_PROCESSES
    failure = None
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                failure = f"process {failed[0]} exited with {procs[failed[0]].returncode}"
                break
            now_sizes = [os.fstat(log.fileno()).st_size for log in logs]
            if now_sizes != sizes:
                sizes, last_progress = now_sizes, time.monotonic()
            if time.monotonic() - last_progress > stall_s:
                failure = f"no progress for {stall_s} s (a hung collective?)"
                break
            if time.monotonic() - start > deadline_s:
                failure = f"no result within {deadline_s} s"
                break
            time.sleep(0.2)
        else:
            failed = [i for i, p in enumerate(procs) if p.returncode != 0]
            if failed:
                failure = f"process {failed[0]} exited with {procs[failed[0]].returncode}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        texts = []
        for i, log in enumerate(logs):
            log.seek(0)
            texts.append(f"--- process {i} ---\n{log.read()[-4000:]}")
            log.close()
    if failure:
        pytest.fail(f"{failure}\n" + "\n".join(texts))
