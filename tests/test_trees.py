"""Dialogue trees score exactly what the per-pair layouts score.

The reference is the shared-prompt layout (itself tested against unshared rows in
test_packing.py) with the same pairs in the same slots, so sequence ids, per-pair arrays, the DPO
loss, its metrics and its gradients are compared one to one. Tolerances as in test_packing.py:
fp32 round-off of sums over a few hundred tokens.
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
import pytest

from pdpo_jax.data import PromptEncoder, examples_from_dialogues
from pdpo_jax.data.pairs import PairIds, dpo_batch, encode_pair
from pdpo_jax.data.trees import PairTree, nested_history_cuts, nested_pairs, nests, pair_trees, tree_batch
from pdpo_jax.train.steps import DPOSettings, dpo_objective
from test_packing import (  # noqa: F401  (pytest fixtures)
    DIALOGUES,
    FAMILY_TEMPLATES,
    LOGP_TOL,
    assert_trees_close,
    bundled,
    sequence_logps,
    tiny_models,
    tokenizer,
)


def dialogue_pairs(dialogues, encoder: PromptEncoder, seed: int = 0) -> list[PairIds]:
    """A pair per model turn: chosen = the gold response, rejected = another example's response."""
    examples = examples_from_dialogues(dialogues)
    rng = np.random.default_rng(seed)
    return [encode_pair(encoder, ex.persona, ex.history, ex.response, examples[(i + 5) % len(examples)].response,
                        ref_chosen_logps=float(rng.normal(-20, 3)), ref_rejected_logps=float(rng.normal(-25, 3)),
                        pair_id=ex.id)
            for i, ex in enumerate(examples)]


def same_slots_shared(trees, pairs_per_row: int, **kwargs):
    """The shared-prompt batch with pair slot r * pairs_per_row + k holding tree r's pair k."""
    slots = []
    for tree in trees:
        members = [] if tree is None else list(tree.pairs)
        slots += members + [None] * (pairs_per_row - len(members))
    return dpo_batch(slots, share_prompt=True, **kwargs)


def dpo_value_and_grad(config):
    return jax.jit(jax.value_and_grad(partial(dpo_objective, config=config, settings=DPOSettings()), has_aux=True))


def assert_same_dpo(config, params, tree, shared, logp_tol=LOGP_TOL, metric_tol=dict(rtol=1e-4, atol=1e-4)):
    for key in ("ref_chosen_logps", "ref_rejected_logps", "pair_mask"):
        np.testing.assert_array_equal(tree[key], shared[key])
    n = 2 * len(tree["pair_mask"])
    np.testing.assert_allclose(sequence_logps(params, config, tree, n), sequence_logps(params, config, shared, n),
                               **logp_tol)
    objective = dpo_value_and_grad(config)
    (tree_sum, tree_metrics), tree_grads = objective(params, tree)
    (shared_sum, shared_metrics), shared_grads = objective(params, shared)
    np.testing.assert_allclose(float(tree_sum), float(shared_sum), rtol=1e-5, atol=1e-5)
    assert set(tree_metrics) == set(shared_metrics)
    for name, (total, count) in tree_metrics.items():
        assert float(count) == float(shared_metrics[name][1]) == float(tree["pair_mask"].sum())
        np.testing.assert_allclose(float(total), float(shared_metrics[name][0]), **metric_tol)
    assert_trees_close(tree_grads, shared_grads)


# ---------------------------------------------------------------------------------------- equality


@pytest.mark.parametrize("family,template", FAMILY_TEMPLATES)
def test_tree_dpo_equals_the_per_pair_layouts(tiny_models, tokenizer, family, template):
    config, params = tiny_models(family)
    pairs = dialogue_pairs(DIALOGUES, PromptEncoder(tokenizer, template))
    trees = pair_trees(pairs)
    assert len(trees) == len(DIALOGUES)  # every dialogue's pairs nest: one tree each
    assert [p.pair_id for t in trees for p in t.pairs] == [p.pair_id for p in pairs]
    per_row = max(t.num_pairs for t in trees)
    rows = trees[:2] + [None] + trees[2:]  # a filler row in the middle must not shift the numbering
    tree = tree_batch(rows, per_row, pad_id=tokenizer.pad_token_id)
    shared = same_slots_shared(rows, per_row, pad_id=tokenizer.pad_token_id)
    assert tree["input_ids"].size * 2 < shared["input_ids"].size  # the point of it
    assert tree["loss_mask"].sum() == shared["loss_mask"].sum()
    assert_same_dpo(config, params, tree, shared)


def test_a_branch_sees_the_trunk_only_before_its_fork(tiny_models, tokenizer):
    config, params = tiny_models("llama")
    pairs = dialogue_pairs(DIALOGUES[-1:], PromptEncoder(tokenizer, "chat-en"))  # the 9-turn dialogue
    (tree,) = pair_trees(pairs)
    before = tree_batch([tree], tree.num_pairs)
    n = 2 * tree.num_pairs
    base = sequence_logps(params, config, before, n)

    # Everything on the trunk from pair 3's chosen on, and every other rejected response, replaced.
    rng = np.random.default_rng(1)
    fork = tree.chosen_starts[3]
    trunk = tree.trunk_ids[:fork] + tuple(int(t) for t in rng.integers(8, len(tokenizer), len(tree.trunk_ids) - fork))
    others = [PairIds(p.prompt_ids, p.chosen_ids, p.rejected_ids if k == 3 else tuple(reversed(p.rejected_ids)))
              for k, p in enumerate(tree.pairs)]
    changed = tree_batch([PairTree(tuple(others), trunk, tree.chosen_starts)], tree.num_pairs)
    after = sequence_logps(params, config, changed, n)
    np.testing.assert_allclose(after[2 * 3 + 1], base[2 * 3 + 1], rtol=0, atol=1e-5)  # pair 3's rejected
    np.testing.assert_allclose(after[0 : 2 * 3 : 2], base[0 : 2 * 3 : 2], rtol=0, atol=1e-5)  # chosen before the fork
    assert np.abs(after[2 * 3 + 3 :: 2] - base[2 * 3 + 3 :: 2]).min() > 1e-4  # later rejected: their trunk changed
    assert np.abs(after[1 : 2 * 3 : 2] - base[1 : 2 * 3 : 2]).min() > 1e-4  # earlier rejected were reversed


# ---------------------------------------------------------------------------------------- grouping


def pair(prompt, chosen, rejected=(9,), name=""):
    return PairIds(tuple(prompt), tuple(chosen), tuple(rejected), pair_id=name)


def test_pairs_share_a_tree_only_while_they_nest_and_fit():
    a = pair([1, 2], [3, 4], name="a")
    b = pair([1, 2, 3, 4, 5], [6], [7, 7], name="b")  # a's prompt + chosen, then a partner line
    c = pair([1, 2, 3, 4, 5, 6, 8], [6], name="c")
    lost_history = pair([5, 6, 8], [2], name="d")  # the prompt lost its oldest history: not a prefix
    assert nests(a, b) and nests(b, c) and not nests(c, lost_history) and not nests(b, a)
    trees = pair_trees([a, b, c, lost_history])
    assert [[p.pair_id for p in t.pairs] for t in trees] == [["a", "b", "c"], ["d"]]
    assert trees[0].trunk_ids == (1, 2, 3, 4, 5, 6, 8, 6) and trees[0].chosen_starts == (2, 5, 7)
    assert len(trees[0]) == 8 + 2 + 3 + 2
    assert [t.num_pairs for t in pair_trees([a, b, c], max_pairs=2)] == [2, 1]
    assert [t.num_pairs for t in pair_trees([a, b, c], max_length=11)] == [2, 1]  # a + b: 6 + 2 + 3 tokens
    assert [t.num_pairs for t in pair_trees([a, b, c], max_length=len(trees[0]))] == [3]
    with pytest.raises(ValueError, match="'e'"):
        pair_trees([pair([1], [2], [], name="e")])


def test_tree_batch_layout_by_hand():
    a = pair([1, 2], [3, 4], [8], name="a")
    b = pair([1, 2, 3, 4, 5], [6], [7, 7], name="b")
    (tree,) = pair_trees([a, b])
    batch = tree_batch([None, tree], pairs_per_row=3, bucket=4)
    assert batch["input_ids"].shape == (2, 12) and batch["pair_mask"].tolist() == [0, 0, 0, 1, 1, 0]
    row = {key: batch[key][1].tolist() for key in batch if batch[key].ndim == 2}
    #             trunk: 1 2 3 4 5 6 | copy of 2, then a's 8 | copy of 5, then b's 7 7 | pad
    assert row["input_ids"] == [1, 2, 3, 4, 5, 6, 2, 8, 5, 7, 7, 0]
    assert row["positions"] == [0, 1, 2, 3, 4, 5, 1, 2, 4, 5, 6, 0]
    assert row["branch_ids"] == [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 0]
    assert row["segment_ids"] == [1] * 11 + [0]
    assert row["targets"] == [2, 3, 4, 5, 6, 0, 8, 0, 7, 7, 0, 0]
    # pair slot 3 (row 1, pair 0): chosen 6, rejected 7; slot 4: chosen 8, rejected 9
    assert row["sequence_ids"] == [-1, 6, 6, -1, 8, -1, 7, -1, 9, 9, -1, -1]
    assert row["loss_mask"] == [0, 1, 1, 0, 1, 0, 1, 0, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="pairs_per_row=1"):
        tree_batch([tree], pairs_per_row=1)


# ---------------------------------------------------------------------------- the bundled model


def test_bundled_model_tree_dpo_equals_the_per_pair_layouts(bundled):
    config, params, tokenizer, dialogues = bundled  # two staged dialogues, chat template
    pairs = dialogue_pairs(dialogues, PromptEncoder(tokenizer, "chat-en"))
    trees = pair_trees(pairs)
    assert len(trees) == 2 and sum(t.num_pairs for t in trees) == len(pairs)
    per_row = max(t.num_pairs for t in trees)
    tree = tree_batch(trees, per_row, pad_id=tokenizer.pad_token_id)
    shared = same_slots_shared(trees, per_row, pad_id=tokenizer.pad_token_id)
    assert_same_dpo(config, params, tree, shared, logp_tol=dict(rtol=1e-5, atol=5e-4),
                    metric_tol=dict(rtol=1e-4, atol=2e-3))


# ------------------------------------------------------------------------------- history cuts


def test_nested_history_cuts_keep_a_chunk_on_one_oldest_line():
    # Turn t has 2t + 1 history lines (partner first); a prompt costs 10 per line kept, room 55.
    lengths = [1, 3, 5, 7, 9]
    cuts = nested_history_cuts(lengths, lambda t, dropped: 10 * (lengths[t] - dropped) <= 55)
    # Turns 0..2 fit when turn 0's one line is dropped (0, 20, 40 tokens) and even when it is kept
    # (10, 30, 50); turn 3 does not (7 lines). Turns 3 and 4 fit from turn 3's partner line on
    # (7 dropped: 0 and 20); the fewest drops both allow are 4 (30 and 50; 2 would leave 70).
    assert cuts == [0, 0, 0, 4, 4]
    assert nested_history_cuts([1, 3], lambda t, dropped: t == 0) == [0, None]


def test_nested_pairs_cut_like_packed_sft_rows_and_share_trees(tokenizer):
    from pdpo_jax.data.packing import dialogue_chunks

    dialogue = DIALOGUES[-1]  # 9 model turns
    encoder = PromptEncoder(tokenizer, "chat-en")
    examples = examples_from_dialogues([dialogue])
    full = len(encoder.prompt_ids(dialogue.persona, examples[-1].history)) + len(encoder.response_ids(examples[-1].response))
    max_length = full * 2 // 3
    # With the gold response as rejected too, each pair's row is its SFT row: the same cuts as packing.
    pairs = nested_pairs(encoder, examples, [ex.response for ex in examples], max_length=max_length)
    chunks = dialogue_chunks(dialogue, encoder, max_length)
    assert len(chunks) > 1
    cut_of_turn = {}
    for chunk in chunks:
        cut_of_turn.update({t: chunk.dropped_history_turns for t in chunk.turn_indices})
    for pair, example in zip(pairs, examples):
        kept = len(encoder.prompt_ids(example.persona, example.history[cut_of_turn[int(example.id.split("#")[1])]:]))
        assert len(pair.prompt_ids) == kept
    assert [t.num_pairs for t in pair_trees(pairs)] == [len(c.turn_indices) for c in chunks]

    # Cut turn by turn instead, the later prompts each drop more history and nest no longer.
    rejected = [examples[(i + 4) % len(examples)].response for i in range(len(examples))]
    per_turn = [encode_pair(encoder, ex.persona, ex.history, ex.response, r, max_length=max_length)
                for ex, r in zip(examples, rejected)]
    nested = nested_pairs(encoder, examples, rejected, max_length=max_length)
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= max_length for p in nested)
    assert len(pair_trees(nested)) < len(pair_trees(per_turn))
