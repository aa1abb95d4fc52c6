"""`pdpo pipeline` on two hosts with the run directory on Cloud Storage, as a pod runs it: the shape of
test_multihost_pipeline.py (two processes on 127.0.0.1, 4 CPU devices each, a tiny model on data 2 x
fsdp 2 x tensor 2), with `run_dir=gs://...` on the local GCS emulator. Its preference records, DNLI
reports and exported weights equal those of one process running the same mesh on local disk, and
every output object is uploaded once, by process 0.

As in test_multihost_pipeline.py, the single-process run starts from the two-host run's SFT model
(copied from the bucket), so every later stage has the same inputs. Records and reports name their
models by path, so the gs:// run directory is replaced by the local one before the bytes are compared.

Cost: one two-process pipeline, one single-process pipeline and two make-prefs runs: 9 to 11 min on
a shared, busy 2-core machine (the two-process run alone took 530 s there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from multihost_fixtures import JAX_CACHE_VARIABLES, REPO_ROOT, TESTS_DIR, run_workers
from test_multihost_pipeline import SCORE_RTOL, TIMING_KEYS, WEIGHT_ATOL, WEIGHT_RTOL, pipeline_args

from gcs_fixtures import gcs_emulator, gcs_env  # noqa: F401 - fixtures
from pdpo_jax.object_store import as_path, filesystem

GCS_WORKER = TESTS_DIR / "gcs_pipeline_worker.py"
LOCAL_WORKER = TESTS_DIR / "multihost_pipeline_worker.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gcs_emulator, gcs_env):
    tmp = tmp_path_factory.mktemp("gcs_pipeline_two_hosts")
    gcs_run = gcs_emulator.create_bucket("two-hosts") + "/run"
    args = pipeline_args(tmp, gcs_run)
    run_workers([sys.executable, str(GCS_WORKER), *args], log_dir=tmp, base_env=gcs_env, devices_per_process=4,
                stall_s=180, deadline_s=900,
                env={"PDPO_TEST_WATCH": gcs_run, "PDPO_TEST_WRITES": str(tmp / "writes_{process}.tsv")})

    local_run = tmp / "run"
    filesystem().get(f"{gcs_run[5:]}/sft", str(local_run / "sft"), recursive=True)  # the same SFT model
    local_args = pipeline_args(tmp, local_run)
    env = {key: value for key, value in gcs_env.items()
           if key in JAX_CACHE_VARIABLES or not key.startswith(("JAX_", "PDPO_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8", OMP_NUM_THREADS="1",
               PDPO_TEST_WATCH=str(local_run), PDPO_TEST_WRITES=str(tmp / "writes_single.tsv"),
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]))
    single = subprocess.run([sys.executable, str(LOCAL_WORKER), *local_args], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    writes = [[line.split("\t") for line in (tmp / f"writes_{p}.tsv").read_text().splitlines()] for p in (0, 1)]
    return gcs_run, local_run, writes


def objects(gcs_run: str, pattern: str) -> list[str]:
    return sorted(str(p)[len(gcs_run) + 1:] for p in as_path(gcs_run).glob(pattern))


def test_every_stage_finished_on_two_hosts_on_the_bucket(runs):
    gcs_run, _, _ = runs
    for stage in ("sft", "prefs", "dpo", "eval/sft", "eval/dpo", "test_responses", "export"):
        assert (as_path(gcs_run) / stage / "DONE").exists(), stage
    assert (as_path(gcs_run) / "summary" / "summary.md").exists()
    for model in ("sft/best", "dpo/best", "export/hf"):
        assert (as_path(gcs_run) / model / "COMMITTED").exists(), model
    assert not [name for name in filesystem().find(gcs_run[5:]) if ".tmp-" in name]  # no staged copy left


def test_preference_records_are_those_of_one_local_process(runs):
    gcs_run, local_run, _ = runs
    shards = objects(gcs_run, "prefs/*/shard-*.jsonl")
    assert len(shards) >= 2 and shards == sorted(str(p.relative_to(local_run)) for p in local_run.glob("prefs/*/shard-*.jsonl"))
    for shard in shards:
        on_bucket = (as_path(gcs_run) / shard).read_bytes().replace(gcs_run.encode(), str(local_run).encode())
        assert on_bucket == (local_run / shard).read_bytes(), shard
    for name in ("summary.json", "settings.json"):
        on_bucket = (as_path(gcs_run) / "prefs" / name).read_text().replace(gcs_run, str(local_run))
        assert json.loads(on_bucket) == json.loads((local_run / "prefs" / name).read_text()), name


def test_dnli_reports_equal_those_of_one_local_process(runs):
    gcs_run, local_run, _ = runs
    for model in ("sft", "dpo"):
        got = json.loads((as_path(gcs_run) / "eval" / model / "dnli.json").read_text())
        expected = json.loads((local_run / "eval" / model / "dnli.json").read_text())
        assert got["candidates"] > 0
        assert got.pop("model_path").endswith(f"run/{model}/best")  # this host's verified copy of gs://.../best
        expected.pop("model_path")
        assert {k: v for k, v in got.items() if k not in TIMING_KEYS} == \
            {k: v for k, v in expected.items() if k not in TIMING_KEYS}, model
    examples = [(as_path(gcs_run) / "eval" / "sft" / "dnli.examples.jsonl").read_bytes(),
                (local_run / "eval" / "sft" / "dnli.examples.jsonl").read_bytes()]
    assert examples[0] == examples[1]  # the same SFT model: every candidate's score, bit for bit
    got, expected = ([json.loads(line) for line in text.splitlines()] for text in (
        (as_path(gcs_run) / "eval" / "dpo" / "dnli.examples.jsonl").read_text(),
        (local_run / "eval" / "dpo" / "dnli.examples.jsonl").read_text()))
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert (a["id"], a["predicted_index"]) == (b["id"], b["predicted_index"])
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=SCORE_RTOL, err_msg=a["id"])


def test_exported_weights_equal_those_of_one_local_process(runs):
    from safetensors.numpy import load as load_bytes
    from safetensors.numpy import load_file

    gcs_run, local_run, _ = runs
    files = objects(gcs_run, "export/hf/*.safetensors")
    assert files and files == sorted(str(p.relative_to(local_run)) for p in local_run.glob("export/hf/*.safetensors"))
    for name in files:
        expected, got = load_file(local_run / name), load_bytes((as_path(gcs_run) / name).read_bytes())
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, err_msg=key)


def test_every_output_object_is_uploaded_once_by_process_zero(runs):
    gcs_run, _, (first, second) = runs
    assert first, "process 0 uploaded nothing the worker saw"
    # process 1 writes only its own part of the checkpoints all processes save together (the array
    # data through tensorstore, which is not listed; its metadata through gcsfs)
    assert second and all(path.endswith("/array_metadatas/process_1") for _, path in second), second
    assert not {path for _, path in first} & {path for _, path in second}
    outputs = [path for event, path in first
               if any(f"/{part}/" in path for part in ("prefs/train", "prefs/val", "eval", "test_responses", "summary"))
               or path.endswith(("/DONE", "/data_summary.json", "/pipeline.json", "/summary.json"))
               or "/export/hf/" in path]
    assert len(outputs) >= 20 and len(outputs) == len(set(outputs)), sorted(p for p in outputs if outputs.count(p) > 1)
    # a committed directory is uploaded to its staged copy, then copied to its place: once each
    names = {name.split("/")[-1] for name in objects(gcs_run, "export/hf/*")}
    assert {p for p in outputs if "/export/hf/" in p} == {f"{gcs_run}/export/hf/{name}" for name in names}


@pytest.fixture(scope="module")
def prefs_killed_and_resumed(runs, gcs_env, tmp_path_factory):
    """make-prefs on the bucket again from nothing, as one process: killed with SIGKILL once its
    first shard is on the bucket, then rerun to the end. Returns (the two-host run's shards, what the
    killed run left, the resumed run's shards), each {name: bytes}."""
    import signal
    import time

    gcs_run, local_run, _ = runs
    fs = filesystem()
    prefs = f"{gcs_run[5:]}/prefs"
    shards = lambda: {name[len(prefs) + 1:]: fs.cat_file(name) for name in fs.find(prefs) if "/shard-" in name}  # noqa: E731
    before = shards()
    fs.rm(fs.find(prefs))
    tmp = tmp_path_factory.mktemp("gcs_prefs_kill")
    args = ["-m", "pdpo_jax.cli", "make-prefs", *pipeline_args(tmp, gcs_run)[1:]]
    env = {key: value for key, value in gcs_env.items()
           if key in JAX_CACHE_VARIABLES or not key.startswith(("JAX_", "PDPO_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8", OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, *args], env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not shards() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait()
    left = shards()
    assert not (as_path(gcs_run) / "prefs" / "DONE").exists(), "make-prefs finished before the kill"
    from pdpo_jax.prefs.record import PrefsError
    from pdpo_jax.prefs.folder import read_records

    with pytest.raises(PrefsError, match="no DONE marker"):  # no reader takes the records of an unfinished run
        read_records(f"{gcs_run}/prefs", "train")
    resumed = subprocess.run([sys.executable, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return before, left, shards()


def test_make_prefs_killed_on_the_bucket_resumes_to_the_same_records(prefs_killed_and_resumed, runs):
    from pdpo_jax.prefs.folder import read_records

    gcs_run, local_run, _ = runs
    before, left, after = prefs_killed_and_resumed
    assert 0 < len(left) < len(before)  # killed part-way: some shards written, whole, the rest not
    assert all(before[name] == data for name, data in left.items())
    assert after == before  # byte for byte what the uninterrupted two-host run wrote
    assert read_records(f"{gcs_run}/prefs", "train", include_dropped=True)
