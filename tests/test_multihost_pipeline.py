"""`pdpo pipeline` as one program on two hosts: two processes on 127.0.0.1 with 4 CPU devices each,
a tiny model on a mesh of data 2 x fsdp 2 x tensor 2 with its layers scanned (as the paper configs
run on pods), every stage, once with the run directory on local disk and once on Cloud Storage
(`run_dir=gs://...` on the local GCS emulator, as a pod runs it). Both are compared with ONE run of
one process on the same mesh on 8 devices, on local disk:

- the local two-host run (every stage, SFT included): its preference records (byte for byte), DNLI
  reports, the SFT model's test responses and exported weights equal the single process's; every
  file of the run directory is written once, by process 0 (process 1 writes only its own part of
  each orbax checkpoint). A make-prefs crash after the first shards resumes on both processes and
  writes the records of the uninterrupted run.
- the gs:// two-host run (every stage after SFT): the same records, reports and weights, every
  output object uploaded once, by process 0 (process 1 only its part of the DPO checkpoints the
  processes save together on the bucket); make-prefs killed with SIGKILL on the bucket, as one
  process, resumes to the same records, and no reader takes an unfinished run's records.

Training on two processes reduces gradients across them in another order than one process does,
so the two SFT models agree to fp32 rounding, not bit for bit, and a sampled negative could then
legitimately differ (test_multihost.py compares two-process training with one process). The
single-process run and the gs:// run therefore start from the local two-host run's SFT model, and
from there every stage has the same inputs: sampling, scoring and evaluation must agree exactly,
DPO training to rounding. The local runs use the same run directory path (records name their
models by path), one after the other; the gs:// run's records name the bucket, replaced by that
path before the bytes are compared.

Cost: two two-process pipelines (the second reuses the first's compiled programs and skips SFT), a
two-process make-prefs, one single-process pipeline and two single-process make-prefs runs, in one
module so the single-process reference is built once. Measured on the shared 2-core machine at a load
average of about 10: 25 min from a cold compilation cache (the local runs 1096 s, the gs:// run 308 s,
the kill test 92 s), 10 min from a warm one; the two modules this one replaced took 38 min there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from multihost_fixtures import JAX_CACHE_VARIABLES, REPO_ROOT, TESTS_DIR, run_workers
from prefs_fixtures import tiny_llama_with_words

from gcs_fixtures import gcs_emulator, gcs_env  # noqa: F401 - fixtures
from pdpo_jax.data import load_dialogues, read_dnli
from pdpo_jax.object_store import GCS_CACHE_ENV, as_path, filesystem
from pdpo_jax.storage import COMMIT_MARKER

WORKER = TESTS_DIR / "multihost_pipeline_worker.py"
GCS_WORKER = TESTS_DIR / "gcs_pipeline_worker.py"
DEMO = REPO_ROOT / "pdpo_jax" / "resources" / "demo"
TIMING_KEYS = {"seconds", "candidates_per_second"}
JOURNALS = (".partial.jsonl",)  # DNLI scores journaled while an evaluation runs, rewritten by design
# DPO weights trained on two processes: fp32 rounding of another gradient summation order, and the
# DNLI scores of the models trained.
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-6
SCORE_RTOL = 1e-5


def pipeline_args(tmp: Path, run_dir: Path | str) -> list[str]:
    texts = [s for d in load_dialogues(DEMO / "dialogues.txt") for s in (*d.persona, *(t.text for t in d.turns))]
    texts += [t for ex in read_dnli(DEMO / "dnli_eval.jsonl", protocol="all")
              for t in (*ex.persona, *ex.history, *(c for c, _ in ex.candidates))]
    model_dir = tmp / "llama-words-0"
    if not model_dir.exists():
        model_dir = tiny_llama_with_words(tmp, texts + ["your persona : partner you system user assistant"])
    return ["pipeline", "--config", str(REPO_ROOT / "configs" / "demo.yaml"),
            f"run_dir={run_dir}", f"model.path={model_dir}", f"data.train={DEMO / 'dialogues.txt'}",
            f"eval.dnli={DEMO / 'dnli_eval.jsonl'}", "sft.max_steps=3", "sft.eval_every=2", "dpo.max_steps=3",
            "dpo.eval_every=2", "prefs.max_new_tokens=6", "prefs.batch_size=8", "prefs.shard_size=16",
            "data.max_length=192", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.scan_layers=true",
            "judge.serve=null"]


def single_process_env(base_env: dict[str, str], watch: Path | str, writes: Path) -> dict[str, str]:
    """One process with all 8 devices, this checkout's code, the suite's compilation cache and (from
    `gcs_env`) the emulator's folder for hosts' copies of gs:// files."""
    env = {key: value for key, value in base_env.items()
           if key in (*JAX_CACHE_VARIABLES, GCS_CACHE_ENV) or not key.startswith(("JAX_", "PDPO_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8", OMP_NUM_THREADS="1",
               PDPO_TEST_WATCH=str(watch), PDPO_TEST_WRITES=str(writes),
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]))
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory, subprocess_env):
    """The local two-host run (with its make-prefs resume) and the single-process reference.
    Returns (the single-process run, the two-host run, the two-host run's writes per process); both
    ran at `<tmp>/run`, the path their records name."""
    tmp = tmp_path_factory.mktemp("pipeline_two_hosts")
    run_dir = tmp / "run"
    args = pipeline_args(tmp, run_dir)
    run_workers([sys.executable, str(WORKER), *args], log_dir=tmp, base_env=subprocess_env, devices_per_process=4,
                stall_s=180, deadline_s=900,
                env={"PDPO_TEST_WATCH": str(run_dir), "PDPO_TEST_WRITES": str(tmp / "writes_{process}.tsv")})
    # A crash after the first shard of each split: both processes resume, and must write what one run did.
    prefs = run_dir / "prefs"
    lost = [p for p in prefs.glob("*/shard-*.jsonl") if not p.name.endswith("00000.jsonl")]
    assert lost
    for path in [*lost, prefs / "DONE", prefs / "summary.json"]:
        path.unlink()
    run_workers([sys.executable, str(WORKER), "make-prefs", *args[1:]], log_dir=tmp, base_env=subprocess_env,
                devices_per_process=4, stall_s=180, deadline_s=600,
                env={"PDPO_TEST_WATCH": str(run_dir), "PDPO_TEST_WRITES": str(tmp / "resume_writes_{process}.tsv")})
    resumed = sorted(line.split("\t")[1] for line in (tmp / "resume_writes_0.tsv").read_text().splitlines()
                     if "/shard-" in line)
    assert resumed == sorted(str(p.resolve()) for p in lost)  # only the lost shards were made again
    assert "shard-" not in (tmp / "resume_writes_1.tsv").read_text()
    run_dir.rename(tmp / "two")
    shutil.copytree(tmp / "two" / "sft", run_dir / "sft")  # the same SFT model: see the module docstring
    single = subprocess.run([sys.executable, str(WORKER), *args], env=single_process_env(
        subprocess_env, run_dir, tmp / "writes_single.tsv"), cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=900)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    run_dir.rename(tmp / "one")
    writes = [[line.split("\t") for line in (tmp / f"writes_{p}.tsv").read_text().splitlines()] for p in (0, 1)]
    return tmp / "one", tmp / "two", writes


def relative_files(root: Path, pattern: str) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.glob(pattern) if p.is_file())


def test_every_stage_finished_on_two_hosts(runs):
    _, two, _ = runs
    for stage in ("sft", "prefs", "dpo", "eval/sft", "eval/dpo", "test_responses", "export"):
        assert (two / stage / "DONE").exists(), stage
    assert (two / "summary" / "summary.md").exists()


def test_preference_records_are_byte_for_byte_those_of_one_process(runs):
    one, two, _ = runs
    shards = relative_files(one, "prefs/*/shard-*.jsonl")
    assert len(shards) >= 2 and shards == relative_files(two, "prefs/*/shard-*.jsonl")
    for shard in shards:
        assert (two / shard).read_bytes() == (one / shard).read_bytes(), shard
    assert sum(len((one / s).read_text().splitlines()) for s in shards) > 0
    for name in ("summary.json", "settings.json"):
        assert json.loads((two / "prefs" / name).read_text()) == json.loads((one / "prefs" / name).read_text())


def test_dnli_reports_equal_those_of_one_process(runs):
    one, two, _ = runs
    for model in ("sft", "dpo"):
        reports = [json.loads((run / "eval" / model / "dnli.json").read_text()) for run in (one, two)]
        assert reports[0]["candidates"] > 0
        assert {k: v for k, v in reports[1].items() if k not in TIMING_KEYS} == \
            {k: v for k, v in reports[0].items() if k not in TIMING_KEYS}, model
    # the same SFT model scored on two hosts: every candidate's score, bit for bit
    examples = [(run / "eval" / "sft" / "dnli.examples.jsonl").read_bytes() for run in (one, two)]
    assert examples[1] == examples[0]
    # DPO models equal to rounding: the same picks, scores to rounding
    expected, got = ([json.loads(line) for line in (run / "eval" / "dpo" / "dnli.examples.jsonl").read_text().splitlines()]
                     for run in (one, two))
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert (a["id"], a["predicted_index"]) == (b["id"], b["predicted_index"])
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=SCORE_RTOL, err_msg=a["id"])


def test_test_responses_of_the_same_sft_model_equal_those_of_one_process(runs):
    one, two, _ = runs
    files = [run / "test_responses" / "sft.jsonl" for run in (one, two)]
    assert files[0].read_text().count("\n") > 0
    assert files[1].read_bytes() == files[0].read_bytes()
    for run in (one, two):
        assert json.loads((run / "test_responses" / "DONE").read_text())["turns"] > 0


def test_exported_weights_equal_those_of_one_process(runs):
    from safetensors.numpy import load_file

    one, two, _ = runs
    files = relative_files(one, "export/hf/*.safetensors")
    assert files and files == relative_files(two, "export/hf/*.safetensors")
    for name in files:
        expected, got = load_file(one / name), load_file(two / name)
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, err_msg=key)
    for name in ("config.json", "generation_config.json"):
        assert (two / "export" / "hf" / name).read_text() == (one / "export" / "hf" / name).read_text()


def test_every_file_is_written_once_by_process_zero(runs):
    _, _, (first, second) = runs
    assert first, "process 0 wrote nothing the audit hook saw"
    # process 1 writes only its own part of the checkpoints that all processes save together
    assert second and all(path.endswith("/array_metadatas/process_1") for _, path in second), second
    assert not {path for _, path in first} & {path for _, path in second}
    outputs = [path for event, path in first if event in ("os.rename", "os.replace")
               and any(f"/{part}/" in path for part in ("prefs", "eval", "test_responses", "export", "summary"))
               and not path.endswith(JOURNALS)
               or path.endswith(("/DONE", "/data_summary.json", "/pipeline.json"))]
    assert len(outputs) >= 20 and len(outputs) == len(set(outputs)), sorted(p for p in outputs if outputs.count(p) > 1)


# --- the same two-host pipeline with its run directory on gs:// ----------------------------------


@pytest.fixture(scope="module")
def gcs_runs(runs, gcs_emulator, gcs_env):
    """The two-host pipeline on the bucket, from the local two-host run's SFT model. Returns (the
    bucket's run folder, the path the single-process run ran at, the writes of each process)."""
    one, two, _ = runs
    tmp = one.parent
    gcs_run = gcs_emulator.create_bucket("two-hosts") + "/run"
    # The same SFT model, as a finished SFT stage leaves it on the bucket: best/ committed by its marker.
    filesystem().put(str(two / "sft"), f"{gcs_run[5:]}/sft", recursive=True)
    filesystem().pipe_file(f"{gcs_run[5:]}/sft/best/{COMMIT_MARKER}", b"")
    logs = tmp / "gcs_logs"
    logs.mkdir()
    run_workers([sys.executable, str(GCS_WORKER), *pipeline_args(tmp, gcs_run)], log_dir=logs, base_env=gcs_env,
                devices_per_process=4, stall_s=180, deadline_s=900,
                env={"PDPO_TEST_WATCH": gcs_run, "PDPO_TEST_WRITES": str(logs / "writes_{process}.tsv")})
    writes = [[line.split("\t") for line in (logs / f"writes_{p}.tsv").read_text().splitlines()] for p in (0, 1)]
    return gcs_run, tmp / "run", writes


def objects(gcs_run: str, pattern: str) -> list[str]:
    return sorted(str(p)[len(gcs_run) + 1:] for p in as_path(gcs_run).glob(pattern))


def test_every_stage_finished_on_two_hosts_on_the_bucket(gcs_runs):
    gcs_run, _, _ = gcs_runs
    for stage in ("prefs", "dpo", "eval/sft", "eval/dpo", "test_responses", "export"):  # sft/ was put there
        assert (as_path(gcs_run) / stage / "DONE").exists(), stage
    assert (as_path(gcs_run) / "summary" / "summary.md").exists()
    for model in ("dpo/best", "export/hf"):
        assert (as_path(gcs_run) / model / "COMMITTED").exists(), model
    assert not [name for name in filesystem().find(gcs_run[5:]) if ".tmp-" in name]  # no staged copy left


def test_preference_records_on_the_bucket_are_those_of_one_local_process(gcs_runs, runs):
    gcs_run, ran_at, _ = gcs_runs
    one, _, _ = runs
    shards = objects(gcs_run, "prefs/*/shard-*.jsonl")
    assert len(shards) >= 2 and shards == [str(p) for p in relative_files(one, "prefs/*/shard-*.jsonl")]
    for shard in shards:
        on_bucket = (as_path(gcs_run) / shard).read_bytes().replace(gcs_run.encode(), str(ran_at).encode())
        assert on_bucket == (one / shard).read_bytes(), shard
    for name in ("summary.json", "settings.json"):
        on_bucket = (as_path(gcs_run) / "prefs" / name).read_text().replace(gcs_run, str(ran_at))
        assert json.loads(on_bucket) == json.loads((one / "prefs" / name).read_text()), name


def test_dnli_reports_on_the_bucket_equal_those_of_one_local_process(gcs_runs, runs):
    gcs_run, _, _ = gcs_runs
    one, _, _ = runs
    for model in ("sft", "dpo"):
        got = json.loads((as_path(gcs_run) / "eval" / model / "dnli.json").read_text())
        expected = json.loads((one / "eval" / model / "dnli.json").read_text())
        assert got["candidates"] > 0
        assert got.pop("model_path").endswith(f"run/{model}/best")  # this host's verified copy of gs://.../best
        expected.pop("model_path")
        assert {k: v for k, v in got.items() if k not in TIMING_KEYS} == \
            {k: v for k, v in expected.items() if k not in TIMING_KEYS}, model
    examples = [(as_path(gcs_run) / "eval" / "sft" / "dnli.examples.jsonl").read_bytes(),
                (one / "eval" / "sft" / "dnli.examples.jsonl").read_bytes()]
    assert examples[0] == examples[1]  # the same SFT model: every candidate's score, bit for bit
    got, expected = ([json.loads(line) for line in text.splitlines()] for text in (
        (as_path(gcs_run) / "eval" / "dpo" / "dnli.examples.jsonl").read_text(),
        (one / "eval" / "dpo" / "dnli.examples.jsonl").read_text()))
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert (a["id"], a["predicted_index"]) == (b["id"], b["predicted_index"])
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=SCORE_RTOL, err_msg=a["id"])


def test_exported_weights_on_the_bucket_equal_those_of_one_local_process(gcs_runs, runs):
    from safetensors.numpy import load as load_bytes
    from safetensors.numpy import load_file

    gcs_run, _, _ = gcs_runs
    one, _, _ = runs
    files = objects(gcs_run, "export/hf/*.safetensors")
    assert files and files == [str(p) for p in relative_files(one, "export/hf/*.safetensors")]
    for name in files:
        expected, got = load_file(one / name), load_bytes((as_path(gcs_run) / name).read_bytes())
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, err_msg=key)


def test_every_output_object_is_uploaded_once_by_process_zero(gcs_runs):
    gcs_run, _, (first, second) = gcs_runs
    assert first, "process 0 uploaded nothing the worker saw"
    # process 1 writes only its own part of the checkpoints all processes save together (the array
    # data through tensorstore, which is not listed; its metadata through gcsfs)
    assert second and all(path.endswith("/array_metadatas/process_1") for _, path in second), second
    assert not {path for _, path in first} & {path for _, path in second}
    outputs = [path for event, path in first
               if any(f"/{part}/" in path for part in ("prefs/train", "prefs/val", "eval", "test_responses", "summary"))
               and not path.endswith(JOURNALS)
               or path.endswith(("/DONE", "/data_summary.json", "/pipeline.json", "/summary.json"))
               or "/export/hf/" in path]
    assert len(outputs) >= 20 and len(outputs) == len(set(outputs)), sorted(p for p in outputs if outputs.count(p) > 1)
    # a committed directory is uploaded to its staged copy, then copied to its place: once each
    names = {name.split("/")[-1] for name in objects(gcs_run, "export/hf/*")}
    assert {p for p in outputs if "/export/hf/" in p} == {f"{gcs_run}/export/hf/{name}" for name in names}


@pytest.fixture(scope="module")
def prefs_killed_and_resumed(gcs_runs, gcs_env):
    """make-prefs on the bucket again from nothing, as one process: killed with SIGKILL once its
    first shard is on the bucket, then rerun to the end. Returns (the two-host run's shards, what the
    killed run left, the resumed run's shards), each {name: bytes}."""
    import signal
    import time

    gcs_run, ran_at, _ = gcs_runs
    fs = filesystem()
    prefs = f"{gcs_run[5:]}/prefs"
    shards = lambda: {name[len(prefs) + 1:]: fs.cat_file(name) for name in fs.find(prefs) if "/shard-" in name}  # noqa: E731
    before = shards()
    fs.rm(fs.find(prefs))
    args = ["-m", "pdpo_jax.cli", "make-prefs", *pipeline_args(ran_at.parent, gcs_run)[1:]]
    env = single_process_env(gcs_env, gcs_run, ran_at.parent / "kill_writes.tsv")
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
    from pdpo_jax.prefs.folder import read_records
    from pdpo_jax.prefs.record import PrefsError

    with pytest.raises(PrefsError, match="no DONE marker"):  # no reader takes the records of an unfinished run
        read_records(f"{gcs_run}/prefs", "train")
    resumed = subprocess.run([sys.executable, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return before, left, shards()


def test_make_prefs_killed_on_the_bucket_resumes_to_the_same_records(prefs_killed_and_resumed, gcs_runs):
    from pdpo_jax.prefs.folder import read_records

    gcs_run, _, _ = gcs_runs
    before, left, after = prefs_killed_and_resumed
    assert 0 < len(left) < len(before)  # killed part-way: some shards written, whole, the rest not
    assert all(before[name] == data for name, data in left.items())
    assert after == before  # byte for byte what the uninterrupted two-host run wrote
    assert read_records(f"{gcs_run}/prefs", "train", include_dropped=True)
