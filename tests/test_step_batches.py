"""Training steps laid out per global batch: on several hosts each host's part, put side by side in
host order, is exactly the stack one host builds (sequence ids included), and a step is only as
wide as its own items."""

from __future__ import annotations

import numpy as np
import pytest

from pdpo_jax.train.batches import StepBatches

BATCH, ACCUM, HOSTS = 4, 2, 2


def rows_of(items, length):
    """A minimal layout: item (prompt, response) scores its response tokens; None rows are empty."""
    ids = np.zeros((len(items), length), np.int32)
    mask = np.zeros((len(items), length), np.float32)
    sequence_ids = np.full((len(items), length), -1, np.int32)
    for row, item in enumerate(items):
        if item is not None:
            prompt, response = item
            ids[row, : prompt + response] = np.arange(1, prompt + response + 1)
            mask[row, prompt - 1 : prompt + response - 1] = 1.0
            sequence_ids[row, prompt - 1 : prompt + response - 1] = row  # numbered within the micro-batch
    return {"input_ids": ids, "loss_mask": mask, "sequence_ids": sequence_ids,
            "item_sizes": np.asarray([sum(item) if item else 0 for item in items], np.int32)}  # a per-item array


def block_of(host):
    """Host `host` of HOSTS feeds block `host` of every batch axis (the meshes of make_mesh)."""
    return lambda n: np.arange(n).reshape(HOSTS, -1)[host]


def step_batches(items, host_rows=None):
    return StepBatches(items, BATCH, ACCUM, seed=5, to_arrays=rows_of, length_of=sum, length_bucket=8,
                       host_rows=host_rows)


@pytest.fixture
def items():
    rng = np.random.default_rng(0)
    return [(int(rng.integers(2, 30)), int(rng.integers(1, 40))) for _ in range(37)]  # last step is partial


def test_hosts_together_feed_exactly_the_single_host_stack(items):
    single = step_batches(items)
    hosts = [step_batches(items, block_of(p)) for p in range(HOSTS)]
    for epoch in range(2):
        for step in range(single.steps_per_epoch()):
            expected = single.batch(epoch, step)
            parts = [host.batch(epoch, step) for host in hosts]
            assert all(part.keys() == expected.keys() for part in parts)
            for key, value in expected.items():
                np.testing.assert_array_equal(np.concatenate([part[key] for part in parts], axis=1), value,
                                              err_msg=f"epoch {epoch} step {step}: {key}")


def test_a_step_is_as_wide_as_its_own_items_not_the_longest_of_the_set(items):
    long_item = (200, 100)
    hosts = [step_batches(items + [long_item], block_of(p)) for p in range(HOSTS)]
    order = hosts[0]._iterator.epoch_order(0)
    long_step = int(np.flatnonzero(order == len(items))[0]) // (BATCH * ACCUM)
    widths = {step: hosts[0].batch(0, step)["input_ids"].shape[-1] for step in range(hosts[0].steps_per_epoch())}
    assert widths[long_step] == 304  # 300 tokens, bucketed to a multiple of 8
    assert all(width < 80 for step, width in widths.items() if step != long_step)


def test_the_second_hosts_sequence_ids_continue_the_first_hosts(items):
    second = step_batches(items, block_of(1)).batch(0, 0)["sequence_ids"]
    assert second.max() == BATCH - 1 and second[second >= 0].min() == BATCH // HOSTS


def test_a_host_whose_devices_hold_interleaved_rows_feeds_those_rows(items):
    odd = step_batches(items, lambda n: np.arange(1, n, 2)).batch(0, 1)
    full = step_batches(items).batch(0, 1)
    for key, value in full.items():
        np.testing.assert_array_equal(odd[key], value[:, 1::2], err_msg=key)
