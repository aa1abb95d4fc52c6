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
from multihost_fixtures import TESTS_DIR, run_workers

from model_fixtures import make_tiny_hf_model
from pdpo_jax.generation import generate
from pdpo_jax.model import load_model

WORKER = TESTS_DIR / "serve_multihost_worker.py"
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
