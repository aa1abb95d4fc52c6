"""An NLI classifier on labelled sentence pairs: accuracy overall and per class, and the confusion
matrix (`pdpo eval-nli`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pdpo_jax.data.nli_batches import encode_pairs
from pdpo_jax.data.nli_pairs import NliPair
from pdpo_jax.model import pad_id
from pdpo_jax.model.classifier import Classifier
from pdpo_jax.nli import class_probabilities


def accuracy_report(predicted: Sequence[int], gold: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """`overall` and `per_class` (over the pairs of each gold class) as {n, correct, accuracy}, and
    `confusion[gold][predicted]` counts; an accuracy over no pairs is None."""
    predicted, gold = np.asarray(predicted, int), np.asarray(gold, int)

    def block(rows: np.ndarray) -> dict[str, Any]:
        n, correct = int(rows.sum()), int((predicted == gold)[rows].sum())
        return {"n": n, "correct": correct, "accuracy": correct / n if n else None}

    return {
        "labels": list(labels),
        "overall": block(np.ones(len(gold), bool)),
        "per_class": {label: block(gold == index) for index, label in enumerate(labels)},
        "confusion": [[int(((gold == g) & (predicted == p)).sum()) for p in range(len(labels))]
                      for g in range(len(labels))],
    }


def evaluate_nli(classifier: Classifier, pairs: Sequence[NliPair], *, max_length: int = 128, rows: int = 32,
                 bucket: int = 32, mesh: Any = None) -> dict[str, Any]:
    """The accuracy report of `classifier` on `pairs` (argmax of its probabilities)."""
    encoded = encode_pairs(classifier.tokenizer, pairs, classifier.labels, max_length=max_length, pad_id=pad_id(classifier))
    probabilities = class_probabilities(classifier, encoded, rows=rows, bucket=bucket, mesh=mesh)
    report = accuracy_report(probabilities.argmax(axis=-1), [p.label for p in encoded], classifier.labels)
    return {"model": str(classifier.path), "pairs": len(encoded), "truncated_pairs": sum(p.truncated for p in encoded),
            **report}
