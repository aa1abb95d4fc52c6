"""`pdpo rounds`: iterative DPO, rounds 2..`dpo.rounds` after `pdpo dpo` (round 1).

Round k samples fresh swapped-persona negatives with round k-1's best model (make-prefs into
`<run_dir>/round-k/prefs`) and trains DPO from that model on them (`<run_dir>/round-k/dpo`), its
reference round k-1's model or, with `dpo.round_reference: sft`, round 1's. Each round's folders
finish with their own DONE markers, so a rerun skips finished rounds and resumes the unfinished one
where it stopped (after its last shard, or its last checkpoint). `RunLayout.dpo_round` says where
each round writes, which models it uses and its seeds; docs/rounds.md tells the whole story.

The two stages of a round are reached through the stage registry, like the pipeline's steps.
"""

from __future__ import annotations

from typing import Any

from pdpo_jax.config import RunConfig
from pdpo_jax.errors import ModelDirError
from pdpo_jax.parallel import primary_decides
from pdpo_jax.run_layout import RunLayout
from pdpo_jax.stage_runner import run_command
from pdpo_jax.stages import STAGES


def run_rounds(config: RunConfig) -> dict[str, Any]:
    """Rounds 2..dpo.rounds, each make-prefs then DPO; returns {round: DPO summary} of the rounds
    run or found finished (empty when dpo.rounds is 1: round 1 is `pdpo make-prefs` and `pdpo dpo`)."""
    layout = RunLayout.of(config)
    make_prefs, train = STAGES["make-prefs"].function(), STAGES["dpo"].function()
    summaries: dict[int, Any] = {}
    if config.dpo.rounds == 1:
        print("rounds: dpo.rounds is 1, nothing to do (round 1 is make-prefs and dpo)")
        return summaries
    first = layout.round_best_model(1)
    if not primary_decides(first.is_dir):
        raise ModelDirError(f"{first}: round 1's best model not found; run pdpo dpo first")
    for number in range(2, config.dpo.rounds + 1):
        make_prefs(config, round_number=number)
        summaries[number] = train(config, round_number=number)
    return summaries


DESCRIPTION = (
    "Iterative DPO after `pdpo dpo`: for each round k = 2..dpo.rounds, sample fresh swapped-persona negatives "
    "with round k-1's best model into <run_dir>/round-k/prefs, then DPO from that model into <run_dir>/round-k/dpo "
    "(reference: round k-1's model, or round 1's with dpo.round_reference=sft). Needs <run_dir>/dpo/best; a rerun "
    "skips finished rounds and resumes the unfinished one."
)


def main(argv: list[str]) -> int:
    return run_command("pdpo rounds", DESCRIPTION, run_rounds, argv)
