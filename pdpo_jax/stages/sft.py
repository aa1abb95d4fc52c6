"""`pdpo sft`: supervised fine-tuning on persona dialogues (loss on response tokens only).

Writes `<run_dir>/sft/`: `checkpoints/` (latest train state, for resumption), `best/` (the
parameters with the lowest validation loss, loadable like a Hugging Face directory),
`metrics.jsonl`, `tensorboard/`, `data_summary.json`, and `DONE` when finished.
"""

from __future__ import annotations

import functools
from typing import Any

from pdpo_jax.storage import atomic_write_json
from pdpo_jax.config import RunConfig
from pdpo_jax.data import PromptEncoder, examples_from_dialogues, per_turn_batch, tokenize_examples
from pdpo_jax.data.corpus import prepare_corpus
from pdpo_jax.data.packing import pack_dialogues, packed_batch, packing_summary
from pdpo_jax.model import Model, pad_id
from pdpo_jax.parallel import host_rows, is_primary
from pdpo_jax.run_layout import RunLayout
from pdpo_jax.stage_runner import load_for_run, run_command, run_once
from pdpo_jax.train.batches import StepBatches
from pdpo_jax.train.fit import fit
from pdpo_jax.train.steps import sft_objective

STAGE = "sft"


def sft_batches(config: RunConfig, model: Model, dialogues: list, *, shuffle: bool,
                mesh: Any = None) -> tuple[StepBatches, dict]:
    """SFT batches of `dialogues` and a summary of the rows.

    `sft.packing: dialogue` puts a dialogue's prompt once in a row with every model response
    scored (several short dialogues may share a row); `turn` makes one row per model turn. Both give
    the same token-mean loss over the same response tokens; a packed row counts as one row of
    `sft.batch_size`, so a step then covers whole dialogues. On a pod each host keeps the rows its
    devices of `mesh` hold.
    """
    data = config.data
    pad = pad_id(model)
    if config.sft.packing == "dialogue":
        encoder = PromptEncoder(model.tokenizer, data.template)
        items = pack_dialogues(dialogues, encoder, data.max_length, on_overflow=data.on_overflow)
        to_arrays = functools.partial(_packed_arrays, pad_id=pad)
        summary = {"layout": "dialogue", **packing_summary(items, data.max_length)}
    else:
        items, stats = tokenize_examples(examples_from_dialogues(dialogues), model.tokenizer, data.template,
                                         max_length=data.max_length, on_overflow=data.on_overflow)
        to_arrays = functools.partial(_per_turn_arrays, pad_id=pad)
        summary = {"layout": "turn", "examples": stats.examples, "truncated": stats.truncated, "skipped": stats.skipped}
    batches = StepBatches(
        items, config.sft.batch_size, config.sft.grad_accum, config.seed, to_arrays=to_arrays, length_of=len,
        length_bucket=data.length_bucket, shuffle=shuffle,
        host_rows=host_rows(mesh),
    )
    return batches, summary


def _packed_arrays(rows, length, *, pad_id):
    return packed_batch(rows, pad_to=length, pad_id=pad_id)


def _per_turn_arrays(rows, length, *, pad_id):
    return per_turn_batch(rows, pad_to=length, pad_id=pad_id)


def run_sft(config: RunConfig) -> dict[str, Any]:
    layout = RunLayout.of(config)
    return run_once(config, STAGE, layout.stage(STAGE), functools.partial(_train, config, layout),
                    batch_sizes={"sft.batch_size": config.sft.batch_size},
                    result_line=lambda s: f"sft: best val loss {s['best_value']:.4f} at step {s['best_step']} -> "
                                          f"{s['best_dir']}")


def _train(config: RunConfig, layout: RunLayout, mesh: Any) -> dict[str, Any]:
    model = load_for_run(config.model.path, config, mesh)
    corpus = prepare_corpus(config.data, config.seed)
    train, train_stats = sft_batches(config, model, corpus.train, shuffle=True, mesh=mesh)
    val, val_stats = sft_batches(config, model, corpus.val, shuffle=False, mesh=mesh)
    if is_primary():
        atomic_write_json(layout.data_summary(STAGE), {**corpus.summary(), "train": train_stats, "val": val_stats})

    objective = functools.partial(sft_objective, config=model.config)
    summary = fit(model=model, objective=objective, section=config.sft, train=train, val=val,
                  out_dir=layout.stage(STAGE), mesh=mesh, seed=config.seed, select_metric="loss",
                  select_higher=False, description="sft")
    summary["best_dir"] = str(layout.best_model(STAGE))
    return summary


DESCRIPTION = ("Supervised fine-tuning of a causal LM on persona dialogues (persona + history -> response; "
               "loss on the response tokens only). Writes <run_dir>/sft/; a rerun resumes from the last checkpoint.")


def main(argv: list[str]) -> int:
    return run_command("pdpo sft", DESCRIPTION, run_sft, argv)
