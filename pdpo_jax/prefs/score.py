"""Reference scoring of preference pairs: the summed log-probs of chosen and rejected under the
reference, one row per pair (`prefs.layout: per_turn`) or one row per run of nesting pairs
(`tree`). Both use the shared scorer (the one DNLI ranking uses) and agree to fp32 rounding.
Where the configured objective needs no reference, nothing is scored (`CountOnlyFn`)."""

from __future__ import annotations

import numpy as np

from pdpo_jax.config import RunConfig
from pdpo_jax.data import shared_prompt_batch, with_scored_positions
from pdpo_jax.data.pairs import PairIds
from pdpo_jax.data.trees import pair_trees, tree_batch
from pdpo_jax.generation.tree_decode import next_power_of_two
from pdpo_jax.objectives import preference_settings
from pdpo_jax.parallel import rows_for_mesh
from pdpo_jax.prefs.side import Side
from pdpo_jax.scoring import make_scorer

PAIR_ARRAYS = ("ref_chosen_logps", "ref_rejected_logps", "pair_mask")  # the DPO step's, not the scorer's


class ScoreFn:
    """The reference's summed log-probs of [prompt | chosen | rejected] rows (`prefs.layout:
    per_turn`), by the shared scorer (the one DNLI ranking uses), in batches of a fixed number of
    rows (rounded up to split over the mesh; every process passes the whole batch and reads every
    score)."""

    def __init__(self, side: Side, rows: int, length_bucket: int):
        self.rows, self.length_bucket = rows_for_mesh(rows, side.mesh), length_bucket
        self._scorer = make_scorer(side.model, num_sequences=2 * self.rows, mesh=side.mesh)

    def __call__(self, prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]]):
        fill = self.rows - len(prompts)
        batch = with_scored_positions(shared_prompt_batch(
            prompts + [prompts[-1]] * fill,
            [[c, r] for c, r in zip(chosen + [chosen[-1]] * fill, rejected + [rejected[-1]] * fill)],
            bucket=self.length_bucket,
        ))
        logps, counts = self._scorer({k: np.asarray(v) for k, v in batch.items()})
        logps = logps.astype(np.float64)
        n = len(prompts)
        return logps[0 : 2 * n : 2], logps[1 : 2 * n : 2], counts[0 : 2 * n : 2], counts[1 : 2 * n : 2]


class TreeScoreFn:
    """The same log-probs (`prefs.layout: tree`) with one row per run of nesting pairs
    (`pdpo_jax.data.trees`): a dialogue's consecutive pairs share one trunk, the last pair's
    [prompt | chosen], on which every chosen response is scored, and each rejected response is a
    branch forking off the trunk where its chosen begins. Rows and pair slots per row are rounded
    up to powers of two (at most the batch size; rows then to split over the mesh), so a run
    compiles a handful of shapes."""

    def __init__(self, side: Side, rows: int, length_bucket: int):
        self.side, self.rows, self.length_bucket = side, rows, length_bucket

    def __call__(self, prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]]):
        pairs = [PairIds(tuple(p), tuple(c), tuple(r)) for p, c, r in zip(prompts, chosen, rejected)]
        trees = pair_trees(pairs)
        rows = rows_for_mesh(next_power_of_two(len(trees), self.rows), self.side.mesh)
        pairs_per_row = next_power_of_two(max(tree.num_pairs for tree in trees), self.rows)
        batch = tree_batch(trees + [None] * (rows - len(trees)), pairs_per_row, bucket=self.length_bucket)
        batch = with_scored_positions({k: v for k, v in batch.items() if k not in PAIR_ARRAYS})
        scorer = make_scorer(self.side.model, num_sequences=2 * rows * pairs_per_row, mesh=self.side.mesh)
        logps, counts = scorer(batch)
        slots = [row * pairs_per_row + k for row, tree in enumerate(trees) for k in range(tree.num_pairs)]
        chosen_at, rejected_at = [2 * slot for slot in slots], [2 * slot + 1 for slot in slots]
        logps = logps.astype(np.float64)
        return logps[chosen_at], logps[rejected_at], counts[chosen_at], counts[rejected_at]


def reference_needed(config: RunConfig) -> bool:
    """Whether the configured preference objective (`dpo.loss_type` and its settings) reads
    reference log-probs, so make-prefs must score them."""
    return preference_settings(config.dpo.loss_type, **config.dpo.objective_settings()).needs.reference_logps


class CountOnlyFn:
    """No reference scoring, for a folder made for an objective that needs no reference (SimPO,
    ORPO): no log-probs (None), and the token counts the scorers would give, each response's ids
    with its end of turn."""

    def __call__(self, prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]]):
        return [None] * len(chosen), [None] * len(rejected), [len(c) for c in chosen], [len(r) for r in rejected]


def scorer_for_layout(config: RunConfig, reference: Side, *,
                      score_reference: bool = True) -> ScoreFn | TreeScoreFn | CountOnlyFn:
    """The reference scorer of `prefs.layout`, or `CountOnlyFn` where no reference is scored."""
    if not score_reference:
        return CountOnlyFn()
    score_class = TreeScoreFn if config.prefs.layout == "tree" else ScoreFn
    return score_class(reference, config.prefs.batch_size, config.data.length_bucket)
