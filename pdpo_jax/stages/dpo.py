"""`pdpo dpo`: DPO (or another preference objective, `dpo.loss_type`) from the SFT model on the
pseudo-preference pairs of `make-prefs`.

The policy starts from the reference model (by default `<run_dir>/sft/best`), whose log-probs of
every chosen and rejected response were computed once by `make-prefs` and are read from the pair
records: the step runs one policy forward per pair and never the reference. Writes
`<run_dir>/dpo/` like the SFT stage; the best model has the highest validation reward accuracy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from pathlib import Path
from typing import Any

from pdpo_jax.storage import atomic_write_json
from pdpo_jax.config import RunConfig
from pdpo_jax.data import PromptEncoder
from pdpo_jax.data.pairs import PairIds, dpo_batch
from pdpo_jax.data.trees import pair_trees, tree_batch, tree_summary
from pdpo_jax.metrics_log import read_metrics_jsonl
from pdpo_jax.model import pad_id
from pdpo_jax.objectives import StartValue, preference_settings
from pdpo_jax.parallel import host_rows, is_primary, primary_decides
from pdpo_jax.prefs import PreferenceRecord, PrefsError, read_records
from pdpo_jax.prefs.filters import check_filters
from pdpo_jax.run_layout import DpoRound, RunLayout
from pdpo_jax.stage_runner import load_for_run, run_command, run_once
from pdpo_jax.train.batches import StepBatches
from pdpo_jax.train.fit import fit
from pdpo_jax.train.steps import dpo_objective

STAGE = "dpo"


def tokenize_pairs(records: list[PreferenceRecord], encoder: PromptEncoder, *, needs_reference: bool = True,
                   where: Path | None = None) -> list[PairIds]:
    """Prompts are rebuilt from the stored (already length-fitted) persona and history, exactly
    as make-prefs scored them, so the stored reference log-probs belong to these very tokens.
    Records made for an objective without a reference carry no reference log-probs: they serve
    only objectives that need none (`needs_reference=False`; the batch then holds zeros there)."""
    if needs_reference:
        unscored = next((r for r in records if r.ref_chosen_logp is None), None)
        if unscored is not None:
            raise PrefsError(f"{where or 'prefs'}: record {unscored.example_id!r} has no reference log-probs (the "
                             "folder was made for an objective without a reference); dpo.loss_type needs them: "
                             "delete the prefs folder and rerun make-prefs")
    return [
        PairIds(tuple(encoder.prompt_ids(r.persona, r.history)), tuple(encoder.response_ids(r.chosen)),
                tuple(encoder.response_ids(r.rejected)), r.ref_chosen_logp or 0.0, r.ref_rejected_logp or 0.0,
                r.example_id)
        for r in records
    ]


def dpo_batches(config: RunConfig, pairs: list[PairIds], pad_id: int, *, shuffle: bool, mesh: Any = None) -> StepBatches:
    """The steps of `dpo.layout`: `shared` rows [prompt | chosen | rejected] (the prompt runs
    once), `unshared` rows [prompt | chosen] and [prompt | rejected], or `tree` rows, a dialogue's
    consecutive pairs on one trunk (`pdpo_jax.data.trees`); all give the same log-probs. A tree
    step holds `dpo.batch_size` trees, a per-pair step `dpo.batch_size` pairs."""
    dpo = config.dpo
    if dpo.layout == "tree":
        items: list[Any] = pair_trees(pairs, max_length=dpo.tree_max_length, max_pairs=dpo.tree_max_pairs)
        to_arrays = functools.partial(_tree_arrays, pad_id=pad_id, pairs_per_row=dpo.tree_max_pairs)
        length_of = len
    else:
        share = dpo.layout == "shared"
        items, length_of = pairs, PairIds.shared_length if share else PairIds.unshared_length
        to_arrays = functools.partial(_pair_arrays, pad_id=pad_id, share_prompt=share)
    return StepBatches(items, dpo.batch_size, dpo.grad_accum, config.seed, to_arrays=to_arrays, length_of=length_of,
                       length_bucket=config.data.length_bucket, shuffle=shuffle, host_rows=host_rows(mesh))


def _pair_arrays(pairs, length, *, pad_id, share_prompt):
    return dpo_batch(pairs, pad_to=length, pad_id=pad_id, share_prompt=share_prompt)


def _tree_arrays(trees, length, *, pad_id, pairs_per_row):
    return tree_batch(trees, pairs_per_row, pad_to=length, pad_id=pad_id)


def run_dpo(config: RunConfig, round_number: int = 1) -> dict[str, Any]:
    """Trains (or resumes) `<run_dir>/dpo`; `round_number` k > 1 trains round k of iterative DPO
    instead (`dpo.rounds`): `round-k/dpo` from round k-1's best model on `round-k/prefs`."""
    this_round = RunLayout.of(config).dpo_round(config, round_number)
    name = STAGE if round_number == 1 else f"dpo round {round_number}"
    return run_once(config, name, this_round.dpo, functools.partial(_train, config, this_round),
                    batch_sizes={"dpo.batch_size": config.dpo.batch_size},
                    result_line=lambda s: f"{name}: best val reward accuracy {s['best_value']:.4f} at step "
                                          f"{s['best_step']} -> {s['best_dir']}")


def _train(config: RunConfig, this_round: DpoRound, mesh: Any) -> dict[str, Any]:
    out_dir = this_round.dpo
    prefs_dir = this_round.prefs
    # Only the pairs the configured filters kept: a folder filtered otherwise is refused.
    primary_decides(check_filters, prefs_dir, config.prefs.filters)
    reference_path = this_round.reference
    config = dataclasses.replace(config, seed=this_round.seed)  # the round's pair order
    model = load_for_run(this_round.start, config, mesh)
    encoder = PromptEncoder(model.tokenizer, config.data.template)
    settings = preference_settings(config.dpo.loss_type, **config.dpo.objective_settings())
    needs_reference = settings.needs.reference_logps
    train_pairs = tokenize_pairs(read_records(prefs_dir, "train"), encoder, needs_reference=needs_reference,
                                 where=prefs_dir)
    val_pairs = tokenize_pairs(read_records(prefs_dir, "val"), encoder, needs_reference=needs_reference,
                               where=prefs_dir)
    if not train_pairs or not val_pairs:
        raise PrefsError(f"{prefs_dir}: no usable train or val pairs (run make-prefs first)")
    train = dpo_batches(config, train_pairs, pad_id(model), shuffle=True, mesh=mesh)
    val = dpo_batches(config, val_pairs, pad_id(model), shuffle=False, mesh=mesh)
    if is_primary():
        summary = {"policy_init": str(this_round.start), "layout": config.dpo.layout, "objective": settings.kind,
                   "train_pairs": len(train_pairs), "val_pairs": len(val_pairs)}
        if this_round.number > 1:
            summary |= {"round": this_round.number, "reference": str(reference_path), "seed": this_round.seed}
        if config.dpo.layout == "tree":
            summary |= {"train_trees": tree_summary(train.items), "val_trees": tree_summary(val.items)}
        atomic_write_json(this_round.data_summary, summary)

    objective = functools.partial(dpo_objective, config=model.config, settings=settings)
    summary = fit(model=model, objective=objective, section=config.dpo, train=train, val=val, out_dir=out_dir,
                  mesh=mesh, seed=config.seed, select_metric="rewards/accuracies", select_higher=True,
                  description="dpo")
    summary["best_dir"] = str(this_round.best_model)
    summary["start_check"] = (check_start(out_dir, settings.start) if this_round.start == reference_path else
                              "not applicable: the policy starts from another model than the reference")
    return summary


def check_start(out_dir: Path, start: StartValue | None) -> str:
    """At step 0 the policy is the reference, so every log-ratio is 0: the objective's `start`
    (`settings.start`: ln 2 for the sigmoid loss, 1/(4β²) for IPO, 1 for hinge, ln 2 for RPO's DPO
    term) must hold with zero reward margins. Anything else means the stored reference log-probs do
    not belong to this model or data. Objectives without a reference have no fixed start."""
    first_val = next((row for row in read_metrics_jsonl(out_dir / "metrics.jsonl")
                      if row.get("split") == "val" and row.get("step") == 0), None)
    if first_val is None or start is None:
        return "not applicable"
    margin = abs(first_val.get("rewards/margins") or 0.0)
    value = first_val.get(start.metric)
    value = math.nan if value is None else value
    if margin < 1e-2 and abs(value - start.value) < 1e-2:
        return f"ok: step-0 val {start.metric} {value:.4f} ({start.formula} = {start.value:.4f}), margin {margin:.2e}"
    message = (f"step-0 val {start.metric} {value:.4f} and margin {margin:.3g} differ from {start.value:.4f} "
               f"({start.formula}) and 0: the stored reference log-probs do not match the policy's start model "
               "(different model, template or data?)")
    print(f"dpo: WARNING: {message}", file=sys.stderr)
    return "mismatch: " + message


DESCRIPTION = ("DPO from the SFT model on pseudo-preference pairs (needs <run_dir>/prefs from `pdpo make-prefs`), "
               "with the objective dpo.loss_type: sigmoid (DPO), ipo, hinge, simpo, orpo or rpo (docs/objectives.md). "
               "Writes <run_dir>/dpo/; a rerun resumes from the last checkpoint. This is round 1 of dpo.rounds; "
               "`pdpo rounds` runs the later ones.")


def main(argv: list[str]) -> int:
    return run_command("pdpo dpo", DESCRIPTION, run_dpo, argv)
