"""`pdpo train-nli`: the three-way NLI classifier (contradiction / neutral / entailment) whose
probabilities are the RL(DialogueNLI) reward.

A decoder trunk (`nli.model`, default the bundled model) gets a classification head on its last
token and is trained on Dialogue NLI sentence pairs (`nli.pairs`) with the SFT/DPO optimizer,
sharding, checkpoints and loop; the best model has the highest validation accuracy, on
`nli.val_pairs` or, without them, on the `nli.val_fraction` of the pairs held out by a stable draw.

Writes `<run_dir>/nli/`: `checkpoints/`, `metrics.jsonl`, `tensorboard/`, `data_summary.json`,
`best/` (orbax parameters beside the classifier's config.json and tokenizer), `classifier/` (the
best model as a Hugging Face directory `AutoModelForSequenceClassification` loads: what `pdpo rl`
and `pdpo eval-nli` read), and `DONE` with the validation accuracy per class. A rerun resumes.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

from pdpo_jax.config import ConfigError, NliSection, RunConfig
from pdpo_jax.data import NLI_LABELS, NliPair, read_nli_pairs
from pdpo_jax.data.nli_batches import EncodedPair, encode_pairs, nli_batch, split_pairs
from pdpo_jax.storage import atomic_write_json
from pdpo_jax.model import pad_id
from pdpo_jax.model.classifier import Classifier, load_classifier, save_classifier, with_classifier_head, write_classifier_files
from pdpo_jax.parallel import barrier, host_rows, is_primary
from pdpo_jax.run_layout import RunLayout
from pdpo_jax.stage_runner import load_for_run, run_command, run_once
from pdpo_jax.train.batches import StepBatches
from pdpo_jax.train.checkpoints import read_best_info
from pdpo_jax.train.fit import fit
from pdpo_jax.train.steps import classifier_objective

STAGE = "nli"


def nli_pair_splits(section: NliSection, seed: int) -> tuple[list[NliPair], list[NliPair]]:
    """(train, validation) pairs of the `nli` section."""
    if not section.pairs:
        raise ConfigError("nli.pairs is empty: name the Dialogue NLI pair files to train the classifier on")
    pairs = [pair for path in section.pairs for pair in read_nli_pairs(path)]
    if section.val_pairs:
        return pairs, [pair for path in section.val_pairs for pair in read_nli_pairs(path)]
    train, val = split_pairs(pairs, section.val_fraction, seed)
    if not train or not val:
        raise ConfigError(f"nli.val_fraction={section.val_fraction} of {len(pairs)} pairs leaves an empty split")
    return train, val


def pair_batches(config: RunConfig, pairs: list[EncodedPair], pad: int, *, shuffle: bool, mesh: Any) -> StepBatches:
    return StepBatches(pairs, config.nli.batch_size, config.nli.grad_accum, config.seed,
                       to_arrays=functools.partial(_pair_arrays, pad_id=pad), length_of=len,
                       length_bucket=config.data.length_bucket, shuffle=shuffle, host_rows=host_rows(mesh))


def _pair_arrays(pairs, length, *, pad_id):
    return nli_batch(pairs, length, pad_id)


def class_counts(pairs: list[NliPair]) -> dict[str, int]:
    counts = Counter(pair.label for pair in pairs)
    return {label: counts.get(label, 0) for label in NLI_LABELS}


def run_train_nli(config: RunConfig) -> dict[str, Any]:
    layout = RunLayout.of(config)
    return run_once(config, STAGE, layout.nli, functools.partial(_train, config, layout),
                    batch_sizes={"nli.batch_size": config.nli.batch_size}, result_line=_result_line)


def _result_line(summary: dict[str, Any]) -> str:
    accuracies = ", ".join(f"{k} {v:.3f}" for k, v in summary["val_accuracy"].items() if v is not None)
    return f"train-nli: best val accuracy at step {summary['best_step']} ({accuracies}) -> {summary['classifier']}"


def _train(config: RunConfig, layout: RunLayout, mesh: Any) -> dict[str, Any]:
    out_dir, section = layout.nli, config.nli
    train_pairs, val_pairs = nli_pair_splits(section, config.seed)
    trunk = load_for_run(section.model, config, mesh)
    files_dir = layout.nli_classifier_files
    if is_primary():
        write_classifier_files(files_dir, trunk, NLI_LABELS)
    barrier("nli-files")
    params = with_classifier_head(trunk.params, trunk.config, len(NLI_LABELS), seed=config.seed)
    classifier = Classifier(trunk.config, params, trunk.tokenizer, files_dir, NLI_LABELS)
    pad = pad_id(trunk)
    encode = functools.partial(encode_pairs, trunk.tokenizer, labels=NLI_LABELS, max_length=section.max_length, pad_id=pad)
    train, val = encode(train_pairs), encode(val_pairs)
    if is_primary():
        atomic_write_json(layout.data_summary(STAGE), {
            "trunk": str(trunk.path), "train_pairs": class_counts(train_pairs), "val_pairs": class_counts(val_pairs),
            "held_out": "nli.val_pairs" if section.val_pairs else f"{section.val_fraction} of nli.pairs (stable draw)",
            "truncated_pairs": sum(p.truncated for p in train + val), "max_length": section.max_length,
        })

    objective = functools.partial(classifier_objective, config=trunk.config, class_names=NLI_LABELS)
    summary = fit(model=classifier, objective=objective, section=section,
                  train=pair_batches(config, train, pad, shuffle=True, mesh=mesh),
                  val=pair_batches(config, val, pad, shuffle=False, mesh=mesh), out_dir=out_dir, mesh=mesh,
                  seed=config.seed, select_metric="accuracy", select_higher=True, description="train-nli")
    save_classifier(layout.nli_classifier, load_classifier(layout.best_model(STAGE), mesh=mesh))
    best_val = read_best_info(layout.best_model(STAGE)).get("val", {})
    summary |= {
        "classifier": str(layout.nli_classifier),
        "val_accuracy": {"overall": best_val.get("accuracy"),
                         **{label: best_val.get(f"accuracy/{label}") for label in NLI_LABELS}},
        "val_pairs": class_counts(val_pairs),
    }
    return summary


DESCRIPTION = ("Train the three-way NLI classifier of the RL(DialogueNLI) baseline on Dialogue NLI sentence pairs "
               "(needs nli.pairs; nli.model is its trunk, default the bundled model). Writes <run_dir>/nli/, with "
               "classifier/ a Hugging Face directory AutoModelForSequenceClassification loads; a rerun resumes.")


def main(argv: list[str]) -> int:
    return run_command("pdpo train-nli", DESCRIPTION, run_train_nli, argv)
