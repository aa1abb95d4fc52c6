"""`pdpo serve` on two hosts: two processes on 127.0.0.1 (jax.distributed on loopback, two CPU
devices each) share one mesh over a tiny llama; process 0 schedules through a `LeaderEngine`,
process 1 follows its calls. Greedy tokens equal `generate`'s on one process, for requests that
join a running batch, across an idle pause. One pair of processes for the module: ~1 minute on
two cores (model load and compiles in both)."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
from multihost_fixtures import REPO_ROOT, TESTS_DIR, run_workers
from prefs_fixtures import tiny_llama_with_words

from model_fixtures import make_tiny_hf_model
from pdpo_jax.generation import generate
from pdpo_jax.model import load_model
from pdpo_jax.run_layout import RunLayout

WORKER = TESTS_DIR / "serve_multihost_worker.py"
JUDGE_WORKER = TESTS_DIR / "judge_multihost_worker.py"
NEVER = 10_000  # an end-of-sequence id the tiny vocabulary never produces
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("serve_two_hosts")
    model_dir = make_tiny_hf_model(root, "llama", initializer_range=0.3)
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, 120, size=int(rng.integers(2, 20)))] for _ in range(6)]
    prompts.append(prompts[1])  # in the second round: restored from its kept prefill on both hosts
    spec = {"prompts": prompts, "never": NEVER, "slots": 4, "max_model_len": 40, "new_tokens": NEW_TOKENS}
    (root / "spec.json").write_text(json.dumps(spec))
    run_workers([sys.executable, str(WORKER), str(model_dir), str(root / "spec.json"), str(root)], log_dir=root,
                base_env=subprocess_env, devices_per_process=2, stall_s=120, deadline_s=600)
    records = [json.loads((root / f"process_{p}.json").read_text()) for p in (0, 1)]
    return model_dir, prompts, records


def test_greedy_tokens_on_two_hosts_equal_one_process(two_hosts):
    model_dir, prompts, records = two_hosts
    model = load_model(model_dir)
    model = dataclasses.replace(model, config=model.config.replace(eos_token_id=NEVER, pad_token_id=0))
    expected = []
    for prompt in prompts:
        ids = np.asarray([prompt])
        expected.append(generate(model, ids, np.ones_like(ids), max_new_tokens=NEW_TOKENS)[0].tolist())
    assert records[0]["tokens"] == expected


def test_the_follower_ran_every_step_of_the_leader(two_hosts):
    _, _, records = two_hosts
    assert records[0]["steps"] > 0 and records[1]["steps"] == records[0]["steps"]


def test_both_hosts_reuse_the_same_kept_prefills(two_hosts):
    _, _, records = two_hosts
    assert records[0]["prompt_cache"]["hits"] == 1
    assert records[1]["prompt_cache"] == records[0]["prompt_cache"]


def test_the_judge_stage_serves_its_judge_over_two_hosts(tmp_path, subprocess_env):
    """`judge.serve` on a two-host mesh: process 0 serves the judge (a tiny Llama with a chat
    template) while process 1 runs its steps; both leave the server together and return process
    0's results, which are written once."""
    texts = ["hi do you have pets ?", "i have two cats .", "yes two cats !", "i have a dog ."]
    model_dir = tiny_llama_with_words(tmp_path, texts)
    run_dir = tmp_path / "run"
    turns = [{"id": f"d{i}-t1", "persona": ["i have two cats ."], "history": ["hi do you have pets ?"]} for i in (1, 2)]
    for model, answer in (("dpo", "yes two cats !"), ("sft", "i have a dog .")):
        path = RunLayout(run_dir).responses(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({**turn, "response": answer, "model": model}) + "\n" for turn in turns))
    overrides = [f"run_dir={run_dir}", f"judge.serve={model_dir}", "judge.model=tiny-judge", "judge.max_tokens=4",
                 "judge.bootstrap=20", "judge.plots=false", "judge.concurrency=2", "judge.timeout=300",
                 "mesh.data=2", "mesh.tensor=2"]
    run_workers([sys.executable, str(JUDGE_WORKER), str(REPO_ROOT / "configs" / "demo.yaml"), str(tmp_path),
                 *overrides], log_dir=tmp_path, base_env=subprocess_env, devices_per_process=2, stall_s=180,
                deadline_s=600)
    records = [json.loads((tmp_path / f"process_{p}.json").read_text()) for p in (0, 1)]
    assert records[1] == records[0] and records[0]["judge"]["model"] == "tiny-judge"
    assert records[0]["requests_sent"] >= 2 * len(turns) and records[0]["status"]["failed"] == 0
    assert (run_dir / "judge" / "DONE").exists()
    assert len((run_dir / "judge" / "judgments.jsonl").read_text().splitlines()) == len(turns)
