"""A sequence classifier's class probabilities for many sentence pairs at once.

Batched like the DNLI scorer: pairs sorted longest first, `rows` at a time, each batch padded to a
multiple of `bucket` tokens, so the jitted forward compiles once per distinct length; on a mesh the
rows are split over its batch axes and every process gets every probability back.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Callable

import jax
import numpy as np

from pdpo_jax.data.batching import bucketed_length
from pdpo_jax.data.nli_batches import EncodedPair, nli_batch
from pdpo_jax.model import ModelConfig, pad_id
from pdpo_jax.model.classifier import Classifier, classifier_logits
from pdpo_jax.parallel import place_batch, replicated, rows_for_mesh

INPUT_KEYS = ("input_ids", "positions", "segment_ids")


@functools.lru_cache(maxsize=16)
def _jitted_probabilities(config: ModelConfig, mesh: Any) -> Callable:
    def probabilities(params, batch):
        logits = classifier_logits(params, config, batch["input_ids"], batch["positions"], batch["segment_ids"])
        return jax.nn.softmax(logits, axis=-1)

    return jax.jit(probabilities) if mesh is None else jax.jit(probabilities, out_shardings=replicated(mesh))


def class_probabilities(classifier: Classifier, pairs: Sequence[EncodedPair], *, rows: int = 32, bucket: int = 32,
                        mesh: Any = None) -> np.ndarray:
    """`[len(pairs), num_labels]` float32 softmax probabilities, in the order of `pairs`."""
    rows = rows_for_mesh(rows, mesh)
    probabilities = np.zeros((len(pairs), len(classifier.labels)), np.float32)
    jitted = _jitted_probabilities(classifier.config, mesh)
    pad = pad_id(classifier)
    order = sorted(range(len(pairs)), key=lambda i: (-len(pairs[i]), i))
    for start in range(0, len(order), rows):
        members = order[start : start + rows]
        length = bucketed_length(max(len(pairs[i]) for i in members), bucket)
        batch = nli_batch([pairs[i] for i in members] + [None] * (rows - len(members)), length, pad)
        result = jitted(classifier.params, place_batch({key: batch[key] for key in INPUT_KEYS}, mesh))
        probabilities[members] = np.asarray(result)[: len(members)]
    return probabilities
