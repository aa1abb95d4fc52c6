"""`pdpo sft`: supervised fine-tuning on persona dialogues (loss on response tokens only).

Writes `<run_dir>/sft/`: `checkpoints/` (latest train state, for resumption), `best/` (the
parameters with the lowest validation loss, loadable like a Hugging Face directory),
`metrics.jsonl`, `tensorboard/`, `data_summary.json`, and `DONE` when finished.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import jax

from pdpo_jax.atomic import atomic_write_json, is_done, mark_done
from pdpo_jax.config import RunConfig
from pdpo_jax.data import examples_from_dialogues, per_turn_batch, tokenize_examples
from pdpo_jax.data.corpus import prepare_corpus
from pdpo_jax.stage import build_mesh, check_batch_fits_mesh, load_for_run, parse_stage_args, stage_dir, write_resolved_config
from pdpo_jax.train.batches import StepBatches, put_stacked_batch
from pdpo_jax.train.loop import LoopPlan, TrainingDiverged, run_loop, total_steps
from pdpo_jax.train.optim import make_optimizer
from pdpo_jax.train.steps import create_train_state, jit_eval_step, jit_train_step, sft_objective, state_shardings

STAGE = "sft"


def sft_batches(config: RunConfig, model: Any, dialogues: list, *, shuffle: bool) -> tuple[StepBatches, dict]:
    """Per-turn SFT batches of `dialogues` and a summary of what tokenization kept."""
    items, stats = tokenize_examples(examples_from_dialogues(dialogues), model.tokenizer, config.data.template,
                                     max_length=config.data.max_length, on_overflow=config.data.on_overflow)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    batches = StepBatches(
        items, config.sft.batch_size, config.sft.grad_accum, config.seed,
        to_arrays=lambda rows, length: per_turn_batch(rows, pad_to=length, pad_id=pad_id),
        length_of=len, max_length=config.data.max_length, length_bucket=config.data.length_bucket, shuffle=shuffle,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    return batches, {"examples": stats.examples, "truncated": stats.truncated, "skipped": stats.skipped}


def run_sft(config: RunConfig) -> dict[str, Any]:
    out_dir = stage_dir(config, STAGE)
    if is_done(out_dir):
        print(f"sft: already finished in {out_dir} (delete its DONE file to rerun)")
        return {"stage_dir": str(out_dir)}
    write_resolved_config(config)
    mesh = build_mesh(config)
    check_batch_fits_mesh(config.sft.batch_size, config, "sft.batch_size")
    model = load_for_run(config.model.path, config, mesh)
    corpus = prepare_corpus(config.data, config.seed)
    train, train_stats = sft_batches(config, model, corpus.train, shuffle=True)
    val, val_stats = sft_batches(config, model, corpus.val, shuffle=False)
    atomic_write_json(out_dir / "data_summary.json", {**corpus.summary(), "train": train_stats, "val": val_stats})

    steps = total_steps(config.sft.epochs, train.steps_per_epoch(), config.sft.max_steps)
    optimizer, _ = make_optimizer(config.sft.optimizer, steps)
    objective = functools.partial(sft_objective, config=model.config)
    shardings = state_shardings(model.params, optimizer, mesh)
    state = jax.jit(functools.partial(create_train_state, optimizer=optimizer), out_shardings=shardings)(model.params)
    put = functools.partial(put_stacked_batch, mesh=mesh)
    plan = LoopPlan(
        stage_dir=out_dir, epochs=config.sft.epochs, total_steps=steps, eval_every=config.sft.eval_every,
        checkpoint_every=config.sft.checkpoint_every, select_metric="loss", select_higher=False,
        model_dir=Path(model.path), description="sft",
    )
    result = run_loop(
        plan, state, step_fn=jit_train_step(objective, optimizer, mesh, shardings),
        eval_fn=jit_eval_step(objective, mesh, model.params), train_batches=train,
        val_batches=[put(batch) for batch in val.all_batches()], put_batch=put,
        state_shardings=shardings, seed=config.seed,
    )
    summary = {key: value for key, value in result.items() if key != "state"}
    summary["best_dir"] = str(out_dir / "best")
    mark_done(out_dir, summary)
    print(f"sft: best val loss {summary['best_value']:.4f} at step {summary['best_step']} -> {summary['best_dir']}")
    return summary


def main(argv: list[str]) -> int:
    config = parse_stage_args(argv, "pdpo sft", "Supervised fine-tuning of a causal LM on persona dialogues "
                              "(persona + history -> response; loss on the response tokens only).")
    try:
        run_sft(config)
    except TrainingDiverged as err:
        print(f"pdpo sft: {err}", file=sys.stderr)
        return 1
    return 0
