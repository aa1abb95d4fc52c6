"""The TPU scripts: valid bash, the gcloud commands they print with --dry-run, and that without it
they run exactly what they print (checked with a stand-in `gcloud` that records its arguments)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TPU_DIR = REPO_ROOT / "tpu"
SCRIPTS = ["common.sh", "create.sh", "setup.sh", "launch.sh"]
LOCATION = ["--name", "pod", "--zone", "europe-west4-a", "--project", "proj"]

pytestmark = [pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed"),
              pytest.mark.usefixtures("subprocess_env")]  # every test runs bash


def fake_gcloud(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """PATH with a `gcloud` that appends its arguments (one per line, then a blank line) to a log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    script = bin_dir / "gcloud"
    script.write_text(f'#!/usr/bin/env bash\nfor a in "$@"; do printf "%s\\n" "$a" >> {shlex.quote(str(log))}; done\n'
                      f'echo >> {shlex.quote(str(log))}\n')
    script.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TPU_", "PDPO_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env, log


def run_script(name: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TPU_DIR / name), *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


def printed_commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def gcloud_calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [block.split("\n") for block in log.read_text().strip("\n").split("\n\n") if block]


def ssh_command(argv: list[str]) -> str:
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
    assert argv[5] == "pod" and "--zone=europe-west4-a" in argv and "--project=proj" in argv
    assert "--worker=all" in argv
    (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return command


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_are_valid_bash_and_strict(name):
    assert subprocess.run(["bash", "-n", str(TPU_DIR / name)], capture_output=True).returncode == 0
    if name != "common.sh":
        assert "set -euo pipefail" in (TPU_DIR / name).read_text()


def test_create_prints_the_gcloud_command_and_runs_only_without_dry_run(tmp_path):
    env, log = fake_gcloud(tmp_path)
    args = [*LOCATION, "--accelerator-type", "v5p-64", "--version", "v2-alpha-tpuv5", "--spot"]
    expected = ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=europe-west4-a", "--project=proj",
                "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot"]
    dry = run_script("create.sh", [*args, "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    assert printed_commands(dry.stdout) == [expected]
    assert gcloud_calls(log) == []

    real = run_script("create.sh", args, env)
    assert real.returncode == 0, real.stderr
    assert printed_commands(real.stdout) == [expected]
    assert [["gcloud", *call] for call in gcloud_calls(log)] == [expected]


def test_create_defaults_come_from_the_environment(tmp_path):
    env, _ = fake_gcloud(tmp_path)
    env |= {"TPU_NAME": "envpod", "TPU_ZONE": "us-east5-a", "TPU_ACCELERATOR": "v4-8"}
    dry = run_script("create.sh", ["--dry-run"], env)
    (command,) = printed_commands(dry.stdout)
    assert command[5] == "envpod" and "--zone=us-east5-a" in command and "--accelerator-type=v4-8" in command
    assert not any(a.startswith("--project") for a in command)


def test_setup_copies_the_code_and_installs_the_pinned_jax_on_all_workers(tmp_path):
    env, log = fake_gcloud(tmp_path)
    dry = run_script("setup.sh", [*LOCATION, "--mount-bucket", "my-bucket", "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    commands = printed_commands(dry.stdout)
    assert gcloud_calls(log) == []
    jax_version = re.search(r"^jax==(\S+)$", (REPO_ROOT / "requirements.lock").read_text(), re.M).group(1)

    assert commands[0][:3] == ["git", "-C", str(REPO_ROOT)] and "archive" in commands[0]
    tarball = commands[0][commands[0].index("-o") + 1]
    scp = commands[1]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5] == tarball
    assert scp[6] == "pod:pdpo_jax.tar.gz" and "--worker=all" in scp
    remote = [ssh_command(c) for c in commands[2:]]
    assert "tar -xzf pdpo_jax.tar.gz -C pdpo_jax" in remote[0]
    assert "python3 -m venv pdpo-venv" in remote[1] and "pip install -q -e pdpo_jax" in remote[1]
    assert f"'jax[tpu]=={jax_version}'" in remote[1]
    assert "pdpo data download --out data" in remote[2]
    assert "gcsfuse --implicit-dirs my-bucket /mnt/my-bucket" in remote[3]
    assert "jax.process_count()" in remote[4] and len(remote) == 5
    assert not Path(tarball).exists()


def test_setup_can_clone_instead_of_copying(tmp_path):
    env, _ = fake_gcloud(tmp_path)
    dry = run_script("setup.sh", [*LOCATION, "--repo", "https://example.org/pdpo_jax.git", "--ref", "v1", "--no-data",
                                  "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    remote = [ssh_command(c) for c in printed_commands(dry.stdout)]
    assert remote[0] == "rm -rf pdpo_jax && git clone --depth 1 --branch v1 https://example.org/pdpo_jax.git pdpo_jax"
    assert not any("data download" in r for r in remote)


def test_launch_runs_the_pipeline_on_every_worker_with_distributed_on(tmp_path):
    env, log = fake_gcloud(tmp_path)
    args = [*LOCATION, "configs/paper/llama-2-7b.yaml", "sft.epochs=1", "run_suffix=-try 2",
            "--run-dir", "/mnt/bkt/runs/llama"]
    dry = run_script("launch.sh", [*args, "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    (command,) = printed_commands(dry.stdout)
    remote = ssh_command(command)
    assert remote.startswith("cd pdpo_jax && PDPO_DISTRIBUTED=1 ../pdpo-venv/bin/pdpo pipeline")
    pdpo_argv = shlex.split(remote.split("&&", 1)[1])[2:]
    assert pdpo_argv == ["pipeline", "--config", "configs/paper/llama-2-7b.yaml", "run_dir=/mnt/bkt/runs/llama",
                         "sft.epochs=1", "run_suffix=-try 2"]
    assert gcloud_calls(log) == []

    real = run_script("launch.sh", args, env)
    assert real.returncode == 0, real.stderr
    assert [["gcloud", *call] for call in gcloud_calls(log)] == [command]

    detached = run_script("launch.sh", [*args, "--detach", "--dry-run"], env)
    remote = ssh_command(printed_commands(detached.stdout)[0])
    assert "nohup env PDPO_DISTRIBUTED=1" in remote and "> logs/launch-" in remote and remote.rstrip().endswith('"')


@pytest.mark.parametrize("args, message", [
    (["--run-dir", "/mnt/x"], "missing CONFIG"),
    (["configs/a.yaml"], "missing --run-dir"),
    (["configs/a.yaml", "--run-dir", "/mnt/x", "--bogus"], "unknown flag: --bogus"),
])
def test_launch_refuses_incomplete_arguments(tmp_path, args, message):
    env, log = fake_gcloud(tmp_path)
    result = run_script("launch.sh", args, env)
    assert result.returncode != 0 and message in result.stderr
    assert gcloud_calls(log) == []
