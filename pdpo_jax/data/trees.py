"""Dialogue trees: the preference pairs of a dialogue's consecutive turns in one row.

The prompts of a dialogue's turns nest: turn t+1's prompt is turn t's prompt, its gold response
(the chosen y_t, end of turn included) and the partner's next line (see templates.py). So one
trunk, the last pair's `[prompt | chosen]`, holds every pair's prompt and chosen response, and
each rejected response hangs off it as a branch:

    trunk:     persona x_1 y_1 x_2 y_2 ... x_T y_T          (branch 0; every chosen y_t scored here)
    branch t:  [copy of the token before y_t] rejected_t    (positions continue from the fork)

A branch starts with a copy of the trunk token just before its chosen response, at that token's
position, and sees the trunk only before that position (the fork rule of docs/design.md), so its
hidden states are those of the per-pair row `[prompt_t | rejected_t]`: every pair's log-probs
equal the shared and unshared layouts' (tests/test_trees.py). Per pair that costs the partner
line, the chosen and the rejected response plus one token, instead of the whole prompt again.

Pairs share a tree only when they nest as tokens (`pair_trees` checks it); a pair of another
dialogue, or one whose prompt starts its history later, starts a new tree, so nothing ever differs
from the per-pair layouts. Cut turn by turn to a length limit, a long dialogue's prompts would
each drop a little more old history and none would nest; `nested_history_cuts` cuts them as
packed SFT rows are cut instead (data/packing.py): consecutive turns keep the same oldest line,
as many turns as fit, then as much history as their last turn allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pdpo_jax.data.batching import _row_length, empty_batch
from pdpo_jax.data.examples import Example
from pdpo_jax.data.pairs import PairIds
from pdpo_jax.data.tokenization import PromptEncoder, history_drop_choices


@dataclass(frozen=True)
class PairTree:
    """Consecutive pairs whose prompt + chosen is a token prefix of the next pair's prompt."""

    pairs: tuple[PairIds, ...]
    trunk_ids: tuple[int, ...]  # the last pair's prompt + chosen
    chosen_starts: tuple[int, ...]  # index in trunk_ids of each pair's first chosen token

    def __len__(self) -> int:
        """Tokens of its row: the trunk, then one copied token and the rejected response per pair."""
        return len(self.trunk_ids) + sum(1 + len(pair.rejected_ids) for pair in self.pairs)

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)


def is_token_prefix(head: Sequence[int], ids: Sequence[int]) -> bool:
    return len(head) <= len(ids) and tuple(ids[: len(head)]) == tuple(head)


def nests(earlier: PairIds, later: PairIds) -> bool:
    """True when `earlier`'s prompt + chosen is a token prefix of `later`'s prompt."""
    return is_token_prefix(earlier.prompt_ids + earlier.chosen_ids, later.prompt_ids)


def pair_trees(pairs: Sequence[PairIds], *, max_length: int | None = None,
               max_pairs: int | None = None) -> list[PairTree]:
    """`pairs` in order, cut into trees of consecutive nesting pairs: a pair joins the current
    tree when it nests with the tree's last pair and the tree stays within `max_length` tokens
    and `max_pairs` pairs; otherwise it starts the next tree. Every pair is in exactly one tree."""
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
    trees: list[PairTree] = []
    members: list[PairIds] = []
    for pair in pairs:
        if not pair.prompt_ids or not pair.chosen_ids or not pair.rejected_ids:
            raise ValueError(f"pair {pair.pair_id!r}: prompt, chosen and rejected need at least one token each")
        if members and nests(members[-1], pair) and (max_pairs is None or len(members) < max_pairs):
            grown = _tree(members + [pair])
            if max_length is None or len(grown) <= max_length:
                members.append(pair)
                continue
        if members:
            trees.append(_tree(members))
        members = [pair]
    if members:
        trees.append(_tree(members))
    return trees


def _tree(members: Sequence[PairIds]) -> PairTree:
    last = members[-1]
    return PairTree(tuple(members), last.prompt_ids + last.chosen_ids,
                    tuple(len(pair.prompt_ids) for pair in members))


def nested_history_cuts(history_lengths: Sequence[int], fits: Callable[[int, int], bool]) -> list[int | None]:
    """How many of the oldest history lines each turn's prompt drops, for consecutive turns of
    one dialogue (turn t + 1's history extends turn t's), so that the turns of a chunk drop the
    same lines and their prompts nest.

    `fits(turn, dropped)` says whether that turn's prompt without its `dropped` oldest lines, plus
    what must follow it (a response, or room to sample one), fits. A chunk starts at a turn with
    the drops `history_drop_choices` allows it, takes as many following turns as fit when all of
    those lines are dropped, then drops as few as all of them allow (the packed SFT rule). None
    for a turn that does not fit even without any history; it belongs to no chunk.
    """
    cuts: list[int | None] = [None] * len(history_lengths)
    first = 0
    while first < len(history_lengths):
        choices = history_drop_choices(history_lengths[first])
        if not fits(first, choices[-1]):
            first += 1
            continue
        end = first + 1
        while end < len(history_lengths) and fits(end, choices[-1]):
            end += 1
        dropped = next(c for c in choices if all(fits(t, c) for t in range(first, end)))
        cuts[first:end] = [dropped] * (end - first)
        first = end
    return cuts


def tree_batch(trees: Sequence[PairTree | None], pairs_per_row: int, pad_to: int | None = None, pad_id: int = 0,
               bucket: int = 64) -> dict[str, np.ndarray]:
    """One tree per row (segment 1), in the batch layout of docs/design.md, plus the per-pair
    `ref_chosen_logps`, `ref_rejected_logps` and `pair_mask` (float32 `[rows * pairs_per_row]`).

    Pair k of row r is pair slot `r * pairs_per_row + k`: its chosen is sequence `2 * slot`, its
    rejected `2 * slot + 1`, as in the per-pair layouts, so the DPO objective and the scorer read
    any layout alike. Unused slots and `None` rows (the filler of a short last batch) have
    pair_mask 0. Row length: the longest tree, rounded up to `bucket`, unless `pad_to` is given.
    """
    too_many = next((t for t in trees if t is not None and t.num_pairs > pairs_per_row), None)
    if too_many is not None:
        raise ValueError(f"a tree of {too_many.num_pairs} pairs (first {too_many.pairs[0].pair_id!r}) does not fit "
                         f"pairs_per_row={pairs_per_row}")
    lengths = [0 if tree is None else len(tree) for tree in trees]
    batch = empty_batch(len(trees), _row_length(max(lengths, default=0), pad_to, bucket), pad_id)
    slots = len(trees) * pairs_per_row
    pair_arrays = {key: np.zeros(slots, np.float32) for key in ("ref_chosen_logps", "ref_rejected_logps", "pair_mask")}
    for row, tree in enumerate(trees):
        if tree is None:
            continue
        trunk = np.asarray(tree.trunk_ids, np.int32)
        end = len(trunk)
        batch["input_ids"][row, :end] = trunk
        batch["positions"][row, :end] = np.arange(end)
        batch["targets"][row, : end - 1] = trunk[1:]
        for k, (pair, start) in enumerate(zip(tree.pairs, tree.chosen_starts)):
            slot = row * pairs_per_row + k
            chosen = slice(start - 1, start - 1 + len(pair.chosen_ids))  # the token before a response predicts its first
            batch["loss_mask"][row, chosen] = 1.0
            batch["sequence_ids"][row, chosen] = 2 * slot
            tokens = np.concatenate([trunk[start - 1 : start], np.asarray(pair.rejected_ids, np.int32)])
            branch = slice(end, end + len(tokens))
            batch["input_ids"][row, branch] = tokens
            batch["positions"][row, branch] = np.arange(start - 1, start - 1 + len(tokens))
            batch["branch_ids"][row, branch] = k + 1
            batch["targets"][row, end : end + len(tokens) - 1] = tokens[1:]
            batch["loss_mask"][row, end : end + len(tokens) - 1] = 1.0
            batch["sequence_ids"][row, end : end + len(tokens) - 1] = 2 * slot + 1
            end += len(tokens)
            pair_arrays["ref_chosen_logps"][slot] = pair.ref_chosen_logps
            pair_arrays["ref_rejected_logps"][slot] = pair.ref_rejected_logps
            pair_arrays["pair_mask"][slot] = 1.0
        batch["segment_ids"][row, :end] = 1
    return {**batch, **pair_arrays}


def tree_summary(trees: Sequence[PairTree]) -> dict[str, float]:
    """Counts for logs: trees, pairs, tokens, and tokens per pair."""
    pairs = sum(tree.num_pairs for tree in trees)
    tokens = sum(len(tree) for tree in trees)
    return {"trees": len(trees), "pairs": pairs, "tokens": tokens, "tokens_per_pair": tokens / max(1, pairs)}


def nested_pairs(encoder: PromptEncoder, examples: Sequence[Example], rejected: Sequence[str], *,
                 max_length: int | None) -> list[PairIds | None]:
    """A pair per example (chosen = its response, rejected = `rejected[i]`), consecutive examples
    of a dialogue cut by `nested_history_cuts` so that they share trees; None for an example that
    does not fit `max_length` even without history. The same pairs serve every DPO layout."""
    pairs: list[PairIds | None] = []
    for group in dialogue_runs(examples):
        responses = [(tuple(encoder.response_ids(examples[i].response)), tuple(encoder.response_ids(rejected[i])))
                     for i in group]

        def fits(turn: int, dropped: int) -> bool:
            example = examples[group[turn]]
            prompt = encoder.prompt_ids(example.persona, example.history[dropped:])
            return max_length is None or len(prompt) + max(map(len, responses[turn])) <= max_length

        cuts = nested_history_cuts([len(examples[i].history) for i in group], fits)
        for turn, (i, dropped) in enumerate(zip(group, cuts)):
            example = examples[i]
            pairs.append(None if dropped is None else PairIds(
                tuple(encoder.prompt_ids(example.persona, example.history[dropped:])), *responses[turn],
                pair_id=example.id))
    return pairs


def dialogue_runs(examples: Sequence[Example]) -> list[list[int]]:
    """Indices of `examples` in runs of consecutive examples of one dialogue, in order."""
    groups: list[list[int]] = []
    for i, example in enumerate(examples):
        if groups and examples[groups[-1][-1]].dialogue_id == example.dialogue_id:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
