"""The NLI consistency reward of a response given its persona (the RL(DialogueNLI) baseline).

The response is the hypothesis against every persona sentence as premise; the classifier gives
each pair contradiction / neutral / entailment probabilities. Then, by `mode`:

    song                     Song et al. (2020): the sentence the response contradicts most (highest
                             contradiction probability) is kept, and the reward is that pair's
                             entailment probability: in [0, 1], low as soon as one fact is contradicted
    entail_minus_contradict  the same sentence; entailment minus contradiction, in [-1, 1]
    entailment               the highest entailment probability over the sentences, no selection

A persona without sentences gives 0. `sentence_probabilities` returns the per-sentence
probabilities the reward was chosen from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pdpo_jax.data.nli_batches import encode_pair
from pdpo_jax.model import pad_id
from pdpo_jax.model.classifier import Classifier
from pdpo_jax.nli.classify import class_probabilities

REWARD_MODES = ("song", "entail_minus_contradict", "entailment")
REQUIRED_LABELS = ("contradiction", "entailment")


def reward_of_sentences(probabilities: np.ndarray, mode: str, labels: Sequence[str]) -> float:
    """One response's reward from its `[sentences, num_labels]` probabilities (class order `labels`)."""
    if mode not in REWARD_MODES:
        raise ValueError(f"unknown NLI reward mode {mode!r}; expected one of {REWARD_MODES}")
    if len(probabilities) == 0:
        return 0.0
    contradiction = probabilities[:, list(labels).index("contradiction")]
    entailment = probabilities[:, list(labels).index("entailment")]
    if mode == "entailment":
        return float(entailment.max())
    kept = int(np.argmax(contradiction))  # the first of equally contradicted sentences
    if mode == "song":
        return float(entailment[kept])
    return float(entailment[kept] - contradiction[kept])


class NliReward:
    """`reward(personas, responses) -> [batch]` float32 with a trained NLI classifier."""

    def __init__(self, classifier: Classifier, mode: str = "song", *, max_length: int = 128, rows: int = 32,
                 bucket: int = 32, mesh: Any = None):
        missing = [label for label in REQUIRED_LABELS if label not in classifier.labels]
        if missing:
            raise ValueError(f"{classifier.path}: the classifier's labels {list(classifier.labels)} lack {missing}")
        if mode not in REWARD_MODES:
            raise ValueError(f"unknown NLI reward mode {mode!r}; expected one of {REWARD_MODES}")
        self.classifier, self.mode = classifier, mode
        self.max_length, self.rows, self.bucket, self.mesh = max_length, rows, bucket, mesh
        self._pad = pad_id(classifier)

    def sentence_probabilities(self, personas: Sequence[Sequence[str]], responses: Sequence[str]) -> list[np.ndarray]:
        """For each response, `[len(persona), num_labels]` probabilities, one row per persona sentence;
        every pair of the batch goes through the classifier together."""
        if len(personas) != len(responses):
            raise ValueError(f"{len(personas)} personas but {len(responses)} responses")
        tokenizer = self.classifier.tokenizer
        pairs = [encode_pair(tokenizer, sentence, response, max_length=self.max_length, pad_id=self._pad)
                 for persona, response in zip(personas, responses) for sentence in persona]
        flat = class_probabilities(self.classifier, pairs, rows=self.rows, bucket=self.bucket, mesh=self.mesh) \
            if pairs else np.zeros((0, len(self.classifier.labels)), np.float32)
        bounds = np.cumsum([0] + [len(persona) for persona in personas])
        return [flat[bounds[i] : bounds[i + 1]] for i in range(len(personas))]

    def __call__(self, personas: Sequence[Sequence[str]], responses: Sequence[str]) -> np.ndarray:
        per_sentence = self.sentence_probabilities(personas, responses)
        return np.asarray([reward_of_sentences(p, self.mode, self.classifier.labels) for p in per_sentence], np.float32)
