"""`pdpo sft`: supervised fine-tuning on persona dialogues (loss on response tokens only).

Writes `<run_dir>/sft/`: `checkpoints/` (latest train state, for resumption), `best/` (the
parameters with the lowest validation loss, loadable like a Hugging Face directory),
`metrics.jsonl`, `tensorboard/`, `data_summary.json`, and `DONE` when finished.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import jax

from pdpo_jax.atomic import atomic_write_json, is_done, mark_done
from pdpo_jax.config import RunConfig
from pdpo_jax.data import examples_from_dialogues, per_turn_batch, tokenize_examples
from pdpo_jax.data.corpus import prepare_corpus
from pdpo_jax.stage import build_mesh, check_batch_fits_mesh, load_for_run, parse_stage_args, stage_dir, write_resolved_config
from pdpo_jax.train.batches import StepBatches
from pdpo_jax.train.fit import fit
from pdpo_jax.train.loop import TrainingDiverged
from pdpo_jax.train.steps import sft_objective

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

    objective = functools.partial(sft_objective, config=model.config)
    summary = fit(model=model, objective=objective, section=config.sft, train=train, val=val, out_dir=out_dir,
                  mesh=mesh, seed=config.seed, select_metric="loss", select_higher=False,
                  description="sft")
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
