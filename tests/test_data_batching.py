"""Batch layout (docs/design.md) and the host-sliced epoch iterator."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdpo_jax.data import (
    BATCH_KEYS,
    SCORED_POSITIONS,
    BatchIterator,
    TokenizedExample,
    per_turn_batch,
    scored_width,
    shared_prompt_batch,
    with_scored_positions,
)


def visible(batch: dict[str, np.ndarray], row: int, i: int) -> list[int]:
    """Indices token i of `row` attends to, by the mask rule of docs/design.md."""
    seg, branch = batch["segment_ids"][row], batch["branch_ids"][row]
    return [j for j in range(i + 1) if seg[j] == seg[i] != 0 and (branch[j] == 0 or branch[j] == branch[i])]


def test_per_turn_layout():
    examples = [TokenizedExample("a", (5, 6, 7), (8, 9, 2)), None, TokenizedExample("b", (5,), (3, 2))]
    batch = per_turn_batch(examples, pad_id=0, bucket=4)
    assert set(batch) == set(BATCH_KEYS) and all(v.shape == (3, 8) for v in batch.values())
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 2, 0, 0]
    assert batch["targets"][0].tolist() == [6, 7, 8, 9, 2, 0, 0, 0]  # the next token of the row
    assert batch["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]  # predicts 8, 9 and the end token
    assert batch["positions"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 0]
    assert batch["segment_ids"][0].tolist() == [1] * 6 + [0, 0]
    assert batch["sequence_ids"][0].tolist() == [-1, -1, 0, 0, 0, -1, -1, -1]
    assert batch["sequence_ids"][2].tolist() == [2, 2] + [-1] * 6 and batch["loss_mask"][2].sum() == 2
    assert not batch["segment_ids"][1].any() and not batch["loss_mask"][1].any() and (batch["sequence_ids"][1] == -1).all()
    assert batch["input_ids"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    assert per_turn_batch(examples[:1]).get("input_ids").shape == (1, 64)
    assert per_turn_batch(examples[:1], pad_to=6)["input_ids"].shape == (1, 6)
    with pytest.raises(ValueError, match="more than pad_to=5"):
        per_turn_batch(examples[:1], pad_to=5)


def test_shared_prompt_layout():
    prompts = [[10, 11, 12, 13, 14], [20]]
    continuations = [[[30, 31], [40]], [[50, 51, 52], [60, 61]]]
    batch = shared_prompt_batch(prompts, continuations, bucket=4)
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 13, 14, 30, 31, 14, 40, 0, 0, 0]
    assert batch["positions"][0].tolist()[:9] == [0, 1, 2, 3, 4, 5, 6, 4, 5]  # each branch starts at the last prompt position
    assert batch["branch_ids"][0].tolist()[:9] == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert batch["targets"][0].tolist()[:9] == [11, 12, 13, 14, 30, 31, 0, 40, 0]
    assert batch["loss_mask"][0].tolist()[:9] == [0, 0, 0, 0, 1, 1, 0, 1, 0]
    assert batch["sequence_ids"][0].tolist()[:9] == [-1, -1, -1, -1, 0, 0, -1, 1, -1]
    assert batch["input_ids"][1].tolist()[:8] == [20, 50, 51, 52, 20, 60, 61, 0]  # a one-token prompt has no trunk
    assert batch["positions"][1].tolist()[:7] == [0, 1, 2, 3, 0, 1, 2]
    assert batch["sequence_ids"][1].tolist()[:7] == [2, 2, 2, -1, 3, 3, -1]  # chosen 2i, rejected 2i + 1
    assert batch["segment_ids"][1].tolist() == [1] * 7 + [0] * 5


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(1, 99), min_size=1, max_size=6),
                          st.lists(st.lists(st.integers(1, 99), min_size=1, max_size=5), min_size=1, max_size=3)),
                min_size=1, max_size=4))
def test_shared_prompt_scores_what_per_turn_scores(rows):
    """Every scored token sees exactly its own prompt + continuation prefix, at the same positions."""
    prompts = [p for p, _ in rows]
    continuations = [c for _, c in rows]
    shared = shared_prompt_batch(prompts, continuations, bucket=8)
    flat = [TokenizedExample(f"{r}.{k}", tuple(p), tuple(c)) for r, (p, cs) in enumerate(rows) for k, c in enumerate(cs)]
    single = per_turn_batch(flat, bucket=8)
    for sequence, example in enumerate(flat):
        row = int(example.example_id.split(".")[0])
        shared_at = np.flatnonzero(shared["sequence_ids"][row] == sequence)
        single_at = np.flatnonzero(single["sequence_ids"][sequence] == sequence)
        assert shared["targets"][row][shared_at].tolist() == single["targets"][sequence][single_at].tolist() == list(example.response_ids)
        for i, j in zip(shared_at, single_at):
            seen_shared = visible(shared, row, i)
            seen_single = visible(single, sequence, j)
            assert shared["input_ids"][row][seen_shared].tolist() == single["input_ids"][sequence][seen_single].tolist()
            assert shared["positions"][row][seen_shared].tolist() == single["positions"][sequence][seen_single].tolist()


def test_batch_argument_errors():
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        shared_prompt_batch([[]], [[[1]]])
    with pytest.raises(ValueError, match="non-empty continuation"):
        shared_prompt_batch([[1]], [[[]]])
    with pytest.raises(ValueError, match="at least one token"):
        per_turn_batch([TokenizedExample("x", (), (1,))])


def test_scored_positions_list_every_scored_column_in_order_then_filler():
    batch = per_turn_batch([TokenizedExample("a", (5, 6, 7), (8, 9)), TokenizedExample("b", (5,), (8, 9, 10, 11)), None],
                           pad_to=20)
    scored = with_scored_positions(batch)[SCORED_POSITIONS]
    assert scored.shape == (3, 16) and scored.dtype == np.int32
    for row in range(3):
        columns = np.flatnonzero(batch["loss_mask"][row])
        assert scored[row, : len(columns)].tolist() == columns.tolist()
        assert (scored[row, len(columns):] == 20).all()  # one past the row: filler
    assert (with_scored_positions(batch, width=4)[SCORED_POSITIONS][1] == [0, 1, 2, 3]).all()


def test_scored_positions_of_a_micro_batch_stack_share_one_width():
    rows = [TokenizedExample(str(i), (1,) * 3, (2,) * (1 + 5 * i)) for i in range(4)]
    stack = {k: np.stack([v[:2], v[2:]]) for k, v in per_turn_batch(rows, pad_to=40).items()}
    scored = with_scored_positions(stack)[SCORED_POSITIONS]
    assert scored.shape == (2, 2, 16)
    assert (scored[1, 1, :16] == np.arange(2, 18)).all()


def test_scored_width_is_a_power_of_two_within_the_row():
    assert [scored_width(n, 300) for n in (0, 1, 16, 17, 100, 256, 257)] == [16, 16, 16, 32, 128, 256, 300]
    assert scored_width(5, 8) == 8
    batch = per_turn_batch([TokenizedExample("a", (1,), (2, 3, 4))], pad_to=8)
    with pytest.raises(ValueError, match="width 2 must lie between the fullest row's 3 scored tokens"):
        with_scored_positions(batch, width=2)


def epoch_items(iterators, epoch):
    """Everything every host gets in `epoch`, and the padding count."""
    seen, padding = [], 0
    for host in iterators:
        for batch in host.epoch_batches(epoch):
            assert len(batch.items) == host.rows_per_host == len(batch.valid)
            assert [item is not None for item in batch.items] == batch.valid.tolist()
            seen += [item for item in batch.items if item is not None]
            padding += int((~batch.valid).sum())
    return seen, padding


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), process_count=st.integers(1, 4), per_host=st.integers(1, 5), seed=st.integers(0, 1000), shuffle=st.booleans())
def test_every_item_once_per_epoch_across_hosts(n, process_count, per_host, seed, shuffle):
    batch_size = process_count * per_host
    items = list(range(n))
    hosts = [BatchIterator(items, batch_size, seed, shuffle, p, process_count) for p in range(process_count)]
    orders = []
    for epoch in range(2):
        seen, padding = epoch_items(hosts, epoch)
        assert sorted(seen) == items
        assert padding == hosts[0].steps_per_epoch * batch_size - n < batch_size
        orders.append(seen)
    again, _ = epoch_items([BatchIterator(items, batch_size, seed, shuffle, p, process_count) for p in range(process_count)], 1)
    assert again == orders[1]  # deterministic per (seed, epoch)
    if n >= batch_size:
        dropped = [BatchIterator(items, batch_size, seed, shuffle, p, process_count, drop_remainder=True) for p in range(process_count)]
        seen, padding = epoch_items(dropped, 0)
        assert padding == 0 and len(seen) == len(set(seen)) == n - n % batch_size


def test_shuffles_per_epoch_and_resumes_mid_epoch():
    items = list(range(20))
    iterator = BatchIterator(items, 4, seed=1, process_index=1, process_count=2)
    stream = list(itertools.islice(iter(iterator), 12))  # 5 steps per epoch: 2 epochs and a bit
    assert [(b.epoch, b.step) for b in stream[4:7]] == [(0, 4), (1, 0), (1, 1)]
    assert [b.items for b in stream[:5]] != [b.items for b in stream[5:10]]
    position = stream[6].next_position
    assert position == (1, 2) and stream[4].next_position == (1, 0)
    resumed = BatchIterator(items, 4, seed=1, process_index=1, process_count=2, start=position)
    assert [b.items for b in itertools.islice(iter(resumed), 5)] == [b.items for b in stream[7:12]]
    in_order = BatchIterator(items, 4, seed=1, shuffle=False)
    assert next(iter(in_order)).items == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="multiple of process_count"):
        BatchIterator(items, 5, seed=0, process_count=2)
    with pytest.raises(ValueError, match="make no batch"):
        BatchIterator(items[:3], 4, seed=0, drop_remainder=True)
    with pytest.raises(ValueError, match="start position"):
        BatchIterator(items, 4, seed=0, start=(0, 5))
