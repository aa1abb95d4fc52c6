"""Two JAX processes on 127.0.0.1 train like one: the multi-host path of SFT, on CPU.

Each worker (tests/multihost_worker.py) has two fake CPU devices; together they form a 4-device
mesh whose parameters are split across the processes. Every process feeds only its own rows of
each global batch. The final parameters must equal a single-process run of the same steps on the
same global batches, and the orbax checkpoint they write together must restore the saved values,
on the training mesh and on a different one.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from model_fixtures import TINY_VOCAB, make_tiny_hf_model
from multihost_fixtures import NUM_PROCESSES, run_workers
from pdpo_jax.model import load_hf
from pdpo_jax.config import OptimizerConfig
from pdpo_jax.train.optim import make_optimizer
from pdpo_jax.train.steps import create_train_state, jit_train_step, sft_objective

TESTS_DIR = Path(__file__).resolve().parent
WORKER = TESTS_DIR / "multihost_worker.py"
STEPS, GLOBAL_ROWS, LENGTH = 3, 8, 16
LEARNING_RATE = 1e-2
# Adam's first update is g / (|g| + eps): with the default eps a gradient that is zero up to rounding
# moves by a full +-learning rate whichever way the rounding went. A larger eps keeps the update
# a smooth function of the gradient, so the comparison measures the sharding, not that cliff.
ADAM_EPS = 1e-3
# Sharded reductions sum in another order than one device does; fp32 rounding of that order.
RTOL, ATOL = 1e-5, 1e-6


def layout_row(rng: np.random.Generator, length: int, sequence_id: int) -> dict[str, np.ndarray]:
    """One row in the batch layout of docs/design.md: one or two packed [prompt | response]
    segments, right padding; loss on the tokens that predict each response."""
    row = {key: np.zeros(length, np.int32) for key in ("input_ids", "positions", "segment_ids", "branch_ids", "targets")}
    row["loss_mask"] = np.zeros(length, np.float32)
    row["sequence_ids"] = np.full(length, -1, np.int32)
    start = 0
    for segment in (1, 2)[: rng.integers(1, 3)]:
        prompt, response = int(rng.integers(2, 5)), int(rng.integers(2, 4))
        n = min(prompt + response, length - start)
        if n <= prompt:
            break
        ids = rng.integers(3, TINY_VOCAB, size=n).astype(np.int32)
        span = slice(start, start + n)
        row["input_ids"][span] = ids
        row["positions"][span] = np.arange(n)
        row["segment_ids"][span] = segment
        row["targets"][start : start + n - 1] = ids[1:]
        scored = slice(start + prompt - 1, start + n - 1)
        row["loss_mask"][scored] = 1.0
        row["sequence_ids"][scored] = sequence_id
        sequence_id += 1
        start += n
    return row


def global_batches(seed: int = 0) -> dict[str, np.ndarray]:
    """[steps, 1, rows, length] per key: `steps` global batches, each one micro-batch."""
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(STEPS):
        rows = [layout_row(rng, LENGTH, sequence_id=2 * r) for r in range(GLOBAL_ROWS)]
        steps.append({key: np.stack([row[key] for row in rows])[None] for key in rows[0]})
    return {key: np.stack([batch[key] for batch in steps]) for key in steps[0]}


def single_process_params(model_dir: Path, batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    config, params = load_hf(model_dir)
    optimizer, _ = make_optimizer(OptimizerConfig(learning_rate=LEARNING_RATE, eps=ADAM_EPS, schedule="constant",
                                                  warmup_ratio=0.0),
                                  total_steps=STEPS)
    state = create_train_state(params, optimizer)
    step = jit_train_step(partial(sft_objective, config=config), optimizer, None)
    for k in range(STEPS):
        state, _ = step(state, {key: value[k] for key, value in batches.items()})
    return {path: np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(state.params, sep="/").items()}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("multihost")
    model_dir = make_tiny_hf_model(root, "llama", seed=3)
    batches = global_batches(seed=1)
    np.savez(root / "batches.npz", **batches)
    out = root / "out"
    run_workers([sys.executable, str(WORKER), "--model", str(model_dir), "--batches", str(root / "batches.npz"),
                 "--checkpoints", str(root / "shared_checkpoints"), "--out", str(out),
                 "--learning-rate", str(LEARNING_RATE), "--adam-eps", str(ADAM_EPS)], log_dir=root,
                base_env=subprocess_env, devices_per_process=2)
    results = [dict(np.load(out / f"process_{i}.npz")) for i in range(NUM_PROCESSES)]
    return model_dir, batches, results


def section(result: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    prefix = f"{name}/"
    return {key[len(prefix):]: value for key, value in result.items() if key.startswith(prefix)}


def test_each_process_feeds_its_own_half_of_every_batch(two_process_run):
    _, _, results = two_process_run
    rows = [set(result["rows"].tolist()) for result in results]
    assert all(len(r) == GLOBAL_ROWS // NUM_PROCESSES for r in rows)
    assert rows[0].isdisjoint(rows[1]) and rows[0] | rows[1] == set(range(GLOBAL_ROWS))


def test_two_processes_match_a_single_process_run(two_process_run):
    model_dir, batches, results = two_process_run
    expected = single_process_params(model_dir, batches)
    _, initial = load_hf(model_dir)
    initial = traverse_util.flatten_dict(jax.tree.map(np.asarray, initial), sep="/")
    for result in results:
        final = section(result, "final")
        assert final.keys() == expected.keys()
        for path, value in expected.items():
            np.testing.assert_allclose(final[path], value, rtol=RTOL, atol=ATOL, err_msg=path)
    # the steps moved the weights far more than the tolerance, so equality above is not vacuous
    moved = max(float(np.max(np.abs(expected[p] - initial[p]))) for p in expected)
    assert moved > 1e3 * ATOL
    np.testing.assert_array_equal(results[0]["losses"], results[1]["losses"])


def test_checkpoint_written_by_both_processes_restores_the_saved_values(two_process_run):
    _, _, results = two_process_run
    for result in results:
        final = section(result, "final")
        assert int(result["restored_step"]) == STEPS and int(result["meta_step"]) == STEPS
        for name in ("restored", "other_mesh"):
            restored = section(result, name)
            assert restored.keys() == final.keys()
            for path, value in final.items():
                np.testing.assert_array_equal(restored[path], value, err_msg=f"{name}: {path}")


# ----------------------------------------------------------------------------- single-process helpers


def test_distributed_settings_come_from_the_standard_variables():
    from pdpo_jax.parallel import distributed_settings_from_env

    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
           "PDPO_DISTRIBUTED_TIMEOUT": "60"}
    assert distributed_settings_from_env(env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                                  "process_id": 3, "initialization_timeout": 60}
    assert distributed_settings_from_env({}) == {}  # a TPU VM: JAX detects everything itself
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='one'"):
        distributed_settings_from_env({"JAX_PROCESS_ID": "one"})


def test_micro_batch_stacks_are_split_on_their_batch_axis():
    from jax.sharding import PartitionSpec as P

    from pdpo_jax import parallel

    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    rows = parallel.process_batch_indices(mesh, 8, batch_axis=1)
    np.testing.assert_array_equal(rows, np.arange(8))  # one process feeds every row
    stack = np.arange(2 * 8 * 3, dtype=np.int32).reshape(2, 8, 3)
    batch = parallel.place_batch({"input_ids": stack[:, rows]}, mesh, batch_axis=1, rows="local")
    assert batch["input_ids"].shape == (2, 8, 3)
    assert batch["input_ids"].sharding.spec == P(None, ("data", "fsdp"))
    assert {shard.data.shape for shard in batch["input_ids"].addressable_shards} == {(2, 2, 3)}
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), stack)
