"""`pdpo dpo`: DPO from the SFT model on the pseudo-preference pairs of `make-prefs`.

The policy starts from the reference model (by default `<run_dir>/sft/best`), whose log-probs of
every chosen and rejected response were computed once by `make-prefs` and are read from the pair
records: the step runs one policy forward per pair and never the reference. Writes
`<run_dir>/dpo/` like the SFT stage; the best model has the highest validation reward accuracy.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from pdpo_jax.atomic import atomic_write_json, is_done, mark_done
from pdpo_jax.config import RunConfig
from pdpo_jax.data import PromptEncoder, TokenizedExample, per_turn_batch
from pdpo_jax.prefs import read_preference_pairs, resolve_model_paths
from pdpo_jax.stage import build_mesh, check_batch_fits_mesh, load_for_run, parse_stage_args, stage_dir, write_resolved_config
from pdpo_jax.train.batches import StepBatches, put_stacked_batch
from pdpo_jax.train.loop import LoopPlan, TrainingDiverged, run_loop, total_steps
from pdpo_jax.train.optim import make_optimizer
from pdpo_jax.train.steps import (
    DPOSettings,
    create_train_state,
    dpo_objective,
    jit_eval_step,
    jit_train_step,
    state_shardings,
)

STAGE = "dpo"


class TokenizedPair:
    """One preference pair as token ids, with the reference log-probs stored by make-prefs."""

    def __init__(self, prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int],
                 ref_chosen: float, ref_rejected: float, pair_id: str):
        self.prompt, self.chosen, self.rejected = tuple(prompt), tuple(chosen), tuple(rejected)
        self.ref_chosen, self.ref_rejected, self.pair_id = ref_chosen, ref_rejected, pair_id

    def __len__(self) -> int:  # the longer of the two [prompt | response] rows
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def tokenize_pairs(records: list[dict[str, Any]], encoder: PromptEncoder) -> list[TokenizedPair]:
    """Prompts are rebuilt from the stored (already length-fitted) persona and history, exactly
    as make-prefs scored them, so the stored reference log-probs belong to these very tokens."""
    return [
        TokenizedPair(encoder.prompt_ids(r["persona"], r["history"]), encoder.response_ids(r["chosen"]),
                      encoder.response_ids(r["rejected"]), r["ref_chosen_logp"], r["ref_rejected_logp"],
                      r["example_id"])
        for r in records
    ]


def unshared_pair_batch(pairs: Sequence[TokenizedPair | None], pad_to: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows [prompt | chosen] (2i) and [prompt | rejected] (2i + 1); sequence id = row."""
    rows: list[TokenizedExample | None] = []
    for pair in pairs:
        if pair is None:
            rows += [None, None]
        else:
            rows.append(TokenizedExample(pair.pair_id, pair.prompt, pair.chosen))
            rows.append(TokenizedExample(pair.pair_id, pair.prompt, pair.rejected))
    arrays = per_turn_batch(rows, pad_to=pad_to, pad_id=pad_id)
    arrays.update(pair_arrays(pairs))
    return arrays


def pair_arrays(pairs: Sequence[TokenizedPair | None]) -> dict[str, np.ndarray]:
    return {
        "ref_chosen_logps": np.array([p.ref_chosen if p else 0.0 for p in pairs], np.float32),
        "ref_rejected_logps": np.array([p.ref_rejected if p else 0.0 for p in pairs], np.float32),
        "pair_mask": np.array([p is not None for p in pairs], np.float32),
    }


def dpo_batches(config: RunConfig, pairs: list[TokenizedPair], pad_id: int, *, shuffle: bool) -> StepBatches:
    return StepBatches(
        pairs, config.dpo.batch_size, config.dpo.grad_accum, config.seed,
        to_arrays=lambda rows, length: unshared_pair_batch(rows, length, pad_id),
        length_of=len, max_length=config.data.max_length, length_bucket=config.data.length_bucket,
        shuffle=shuffle, process_index=jax.process_index(), process_count=jax.process_count(),
    )


def run_dpo(config: RunConfig) -> dict[str, Any]:
    out_dir = stage_dir(config, STAGE)
    if is_done(out_dir):
        print(f"dpo: already finished in {out_dir} (delete its DONE file to rerun)")
        return {"stage_dir": str(out_dir)}
    write_resolved_config(config)
    mesh = build_mesh(config)
    check_batch_fits_mesh(config.dpo.batch_size, config, "dpo.batch_size")
    _, reference_path = resolve_model_paths(config)
    model = load_for_run(reference_path, config, mesh)
    encoder = PromptEncoder(model.tokenizer, config.data.template)
    prefs_dir = stage_dir(config, "prefs")
    train_pairs = tokenize_pairs(read_preference_pairs(prefs_dir, "train"), encoder)
    val_pairs = tokenize_pairs(read_preference_pairs(prefs_dir, "val"), encoder)
    if not train_pairs or not val_pairs:
        raise ValueError(f"{prefs_dir}: no usable train or val pairs (run make-prefs first)")
    atomic_write_json(out_dir / "data_summary.json", {"policy_init": str(reference_path),
                                                      "train_pairs": len(train_pairs), "val_pairs": len(val_pairs)})
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    train = dpo_batches(config, train_pairs, pad_id, shuffle=True)
    val = dpo_batches(config, val_pairs, pad_id, shuffle=False)

    steps = total_steps(config.dpo.epochs, train.steps_per_epoch(), config.dpo.max_steps)
    optimizer, _ = make_optimizer(config.dpo.optimizer, steps)
    settings = DPOSettings(beta=config.dpo.beta, loss_type=config.dpo.loss_type,
                           label_smoothing=config.dpo.label_smoothing, reference_free=config.dpo.reference_free)
    objective = functools.partial(dpo_objective, config=model.config, settings=settings)
    shardings = state_shardings(model.params, optimizer, mesh)
    state = jax.jit(functools.partial(create_train_state, optimizer=optimizer), out_shardings=shardings)(model.params)
    put = functools.partial(put_stacked_batch, mesh=mesh)
    plan = LoopPlan(
        stage_dir=out_dir, epochs=config.dpo.epochs, total_steps=steps, eval_every=config.dpo.eval_every,
        checkpoint_every=config.dpo.checkpoint_every, select_metric="rewards/accuracies", select_higher=True,
        model_dir=Path(reference_path), description="dpo",
    )
    result = run_loop(
        plan, state, step_fn=jit_train_step(objective, optimizer, mesh, shardings),
        eval_fn=jit_eval_step(objective, mesh, model.params), train_batches=train,
        val_batches=[put(batch) for batch in val.all_batches()], put_batch=put,
        state_shardings=shardings, seed=config.seed,
    )
    summary = {key: value for key, value in result.items() if key != "state"}
    summary["best_dir"] = str(out_dir / "best")
    summary["start_check"] = check_start(out_dir, config.dpo.loss_type, config.dpo.reference_free)
    mark_done(out_dir, summary)
    print(f"dpo: best val reward accuracy {summary['best_value']:.4f} at step {summary['best_step']} -> {summary['best_dir']}")
    return summary


def check_start(out_dir: Path, loss_type: str, reference_free: bool) -> str:
    """At step 0 the policy is the reference, so the sigmoid loss must be ln 2 with zero margins;
    anything else means the stored reference log-probs do not belong to this model or data."""
    from pdpo_jax.evaluate.report import load_metrics_jsonl

    first_val = next((row for row in load_metrics_jsonl(out_dir / "metrics.jsonl")
                      if row.get("split") == "val" and row.get("step") == 0), None)
    if first_val is None or loss_type != "sigmoid" or reference_free:
        return "not applicable"
    margin = abs(first_val.get("rewards/margins") or 0.0)
    loss = first_val.get("loss") or math.nan
    if margin < 1e-2 and abs(loss - math.log(2)) < 1e-2:
        return f"ok: step-0 val loss {loss:.4f} (ln 2 = 0.6931), margin {margin:.2e}"
    message = (f"step-0 val loss {loss:.4f} and margin {margin:.3g} differ from ln 2 and 0: the stored reference "
               "log-probs do not match the policy's start model (different model, template or data?)")
    print(f"dpo: WARNING: {message}", file=sys.stderr)
    return "mismatch: " + message


def main(argv: list[str]) -> int:
    config = parse_stage_args(argv, "pdpo dpo", "DPO from the SFT model on pseudo-preference pairs "
                              "(needs <run_dir>/prefs from `pdpo make-prefs`).")
    try:
        run_dpo(config)
    except TrainingDiverged as err:
        print(f"pdpo dpo: {err}", file=sys.stderr)
        return 1
    return 0
