"""`pdpo pipeline` as one program on two hosts: two processes on 127.0.0.1 with 4 CPU devices each,
a tiny model on a mesh of data 2 x fsdp 2 x tensor 2 with its layers scanned (as the paper configs
run on pods), every stage. Its preference records (byte for byte), DNLI reports, the SFT model's
test responses and exported weights equal those of one process running the same mesh on 8 devices,
and every file of the run directory is written once, by process 0 (process 1 writes only its own
part of each orbax checkpoint). A make-prefs crash after the first shards resumes on both
processes and writes the records of the uninterrupted run.

Training on two processes reduces gradients across them in another order than one process does,
so the two SFT models agree to fp32 rounding, not bit for bit, and a sampled negative could then
legitimately differ (test_multihost.py compares two-process training with one process). The
single-process run therefore starts from the two-host run's SFT model, and from there every stage
has the same inputs: sampling, scoring and evaluation must agree exactly, DPO training to rounding.
Both runs use the same run directory path (records name their models by path), one after the other.
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

from pdpo_jax.data import load_dialogues, read_dnli

WORKER = TESTS_DIR / "multihost_pipeline_worker.py"
DEMO = REPO_ROOT / "pdpo_jax" / "resources" / "demo"
TIMING_KEYS = {"seconds", "candidates_per_second"}
# DPO weights trained on two processes: fp32 rounding of another gradient summation order, and the
# DNLI scores of the models trained.
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-6
SCORE_RTOL = 1e-5


def pipeline_args(tmp: Path, run_dir: Path) -> list[str]:
    texts = [s for d in load_dialogues(DEMO / "dialogues.txt") for s in (*d.persona, *(t.text for t in d.turns))]
    texts += [t for ex in read_dnli(DEMO / "dnli_eval.jsonl", protocol="all")
              for t in (*ex.persona, *ex.history, *(c for c, _ in ex.candidates))]
    model_dir = tiny_llama_with_words(tmp, texts + ["your persona : partner you system user assistant"])
    return ["pipeline", "--config", str(REPO_ROOT / "configs" / "demo.yaml"),
            f"run_dir={run_dir}", f"model.path={model_dir}", f"data.train={DEMO / 'dialogues.txt'}",
            f"eval.dnli={DEMO / 'dnli_eval.jsonl'}", "sft.max_steps=3", "sft.eval_every=2", "dpo.max_steps=3",
            "dpo.eval_every=2", "prefs.max_new_tokens=6", "prefs.batch_size=8", "prefs.shard_size=16",
            "data.max_length=192", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.scan_layers=true",
            "judge.serve=null"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, subprocess_env):
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
    env = {key: value for key, value in subprocess_env.items()
           if key in JAX_CACHE_VARIABLES or not key.startswith(("JAX_", "PDPO_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8", OMP_NUM_THREADS="1",
               PDPO_TEST_WATCH=str(run_dir), PDPO_TEST_WRITES=str(tmp / "writes_single.tsv"),
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]))
    single = subprocess.run([sys.executable, str(WORKER), *args], env=env, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=900)
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
               or path.endswith(("/DONE", "/data_summary.json", "/pipeline.json"))]
    assert len(outputs) >= 20 and len(outputs) == len(set(outputs)), sorted(p for p in outputs if outputs.count(p) > 1)
