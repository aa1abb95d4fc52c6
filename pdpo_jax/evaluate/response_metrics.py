"""What a model says, measured on its responses to the test turns: NLI consistency with its persona
(C-score), contradictions, persona copying, diversity and length.

    responses = read_response_file("runs/x/test_responses/dpo.jsonl")   # the test-responses format
    labels = sentence_labels(reward, responses)         # per response, the classifier's label per persona sentence
    report = response_metrics(responses, labels)        # the numbers below, with bootstrap intervals

Definitions (every share and score is over responses, in percent, with a 95% percentile-bootstrap
interval that resamples responses with replacement):

* **C-score**: the NLI classifier labels each (persona sentence, response) pair, premise = the
  sentence, hypothesis = the response, by its most probable class; entailment counts +1, neutral 0,
  contradiction -1. A response's score is the mean over its persona's sentences, and the C-score is
  the mean over responses x 100, in [-100, 100]. (Madotto et al. 2019 sum over the sentences; the
  mean keeps personas of different sizes on one scale.) Responses whose persona has no sentence
  are left out of it and of the contradiction rate (`scored`).
* **contradiction rate**: the share of responses with at least one persona sentence judged
  contradicted.
* **persona-copy rate**: the share of responses that repeat a persona sentence nearly verbatim:
  they hold at least 80% of the sentence's word pairs (adjacent lowercased words;
  `pdpo_jax.data.persona_copy`), the measure `pdpo results` puts above its examples. Beside it, the
  mean of each response's largest share.
* **distinct-1 / distinct-2** (Li et al. 2016): distinct word unigrams (bigrams within a response)
  over all unigrams (bigrams) of all responses, x 100. Words are lowercased runs of letters, digits
  and apostrophes; each other non-space character is a word of its own.
* **mean length**: words per response, by the same split.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdpo_jax.data.persona_copy import COPY_THRESHOLD, persona_copy
from pdpo_jax.errors import PdpoError
from pdpo_jax.evaluate.dnli_stats import DEFAULT_SAMPLES, bootstrap_indices, percentile_interval
from pdpo_jax.nli import NliReward
from pdpo_jax.storage import jsonl_objects

# What each NLI class contributes to the C-score.
LABEL_SCORES = {"entailment": 1, "neutral": 0, "contradiction": -1}
_WORD = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")

__all__ = ["LABEL_SCORES", "ModelResponse", "ResponseMetricsError", "c_score_of", "distinct_n",
           "read_response_file", "response_metrics", "sentence_labels", "words"]


class ResponseMetricsError(PdpoError):
    """A responses file that cannot be measured; the message names the file and line."""


@dataclass(frozen=True)
class ModelResponse:
    """One line of a responses file: what the model was given (its persona) and what it said."""

    id: str
    persona: tuple[str, ...]
    response: str
    model: str | None = None


def read_response_file(path: str | os.PathLike) -> list[ModelResponse]:
    """The lines of a test-responses file (`{"id", "persona": [...], "response", "model", ...}`);
    ids must be unique strings, personas lists of strings."""
    responses, seen = [], set()
    for where, item in jsonl_objects(path, ResponseMetricsError):
        if not isinstance(item.get("id"), str) or item["id"] in seen:
            raise ResponseMetricsError(f"{where}: every response needs a unique string 'id'")
        seen.add(item["id"])
        persona = item.get("persona")
        if not isinstance(persona, list) or not all(isinstance(s, str) for s in persona):
            raise ResponseMetricsError(f"{where}: 'persona' must be a list of strings")
        if not isinstance(item.get("response"), str):
            raise ResponseMetricsError(f"{where}: 'response' must be a string")
        model = item.get("model")
        responses.append(ModelResponse(item["id"], tuple(persona), item["response"],
                                       model if isinstance(model, str) else None))
    if not responses:
        raise ResponseMetricsError(f"{path}: no responses")
    return responses


def sentence_labels(reward: NliReward, responses: Sequence[ModelResponse]) -> list[list[str]]:
    """Per response, the classifier's most probable class of each (persona sentence, response) pair."""
    labels = reward.classifier.labels
    missing = [label for label in LABEL_SCORES if label not in labels]
    if missing:
        raise ResponseMetricsError(f"{reward.classifier.path}: the classifier's labels {list(labels)} lack {missing}")
    probabilities = reward.sentence_probabilities([r.persona for r in responses], [r.response for r in responses])
    return [[labels[i] for i in p.argmax(axis=-1)] for p in probabilities]


def c_score_of(labels: Sequence[str]) -> float:
    """One response's consistency: the mean of +1 / 0 / -1 over its persona sentences' labels."""
    return float(np.mean([LABEL_SCORES[label] for label in labels]))


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of `texts` (each text's own n-grams), x 100; 0 without any."""
    grams = [tuple(ws[i : i + n]) for ws in map(words, texts) for i in range(len(ws) - n + 1)]
    return 100.0 * len(set(grams)) / len(grams) if grams else 0.0


def _with_interval(values: np.ndarray, indices: np.ndarray, confidence: float) -> dict[str, Any]:
    """The mean of per-response `values` (already in percent) and its bootstrap interval."""
    if values.size == 0:
        return {"value": None, "interval": None}
    low, high = percentile_interval(values[indices].mean(axis=1), confidence)
    return {"value": float(values.mean()), "interval": [low, high]}


def response_metrics(responses: Sequence[ModelResponse], labels: Sequence[Sequence[str]], *,
                     samples: int = DEFAULT_SAMPLES, seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """The report of one model's responses, given the classifier's labels of every persona sentence."""
    if len(labels) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(labels)} label lists")
    scored = [i for i, r in enumerate(responses) if r.persona]
    c_scores = np.asarray([100.0 * c_score_of(labels[i]) for i in scored])
    contradicting = np.asarray([100.0 * ("contradiction" in labels[i]) for i in scored])
    shares = np.asarray([persona_copy(r.persona, r.response) for r in responses])
    copying = 100.0 * (shares >= COPY_THRESHOLD)
    texts = [r.response for r in responses]
    scored_draws = bootstrap_indices(["all"] * len(scored), samples, seed) if scored else np.zeros((samples, 0), int)
    all_draws = bootstrap_indices(["all"] * len(responses), samples, seed)
    pairs = [label for i in scored for label in labels[i]]
    models = sorted({r.model for r in responses if r.model})
    return {
        "model": models[0] if len(models) == 1 else None,
        "responses": len(responses),
        "scored": len(scored),
        "c_score": _with_interval(c_scores, scored_draws, confidence),
        "contradiction_rate": _with_interval(contradicting, scored_draws, confidence),
        "persona_copy_rate": _with_interval(copying, all_draws, confidence),
        "mean_persona_copy": float(shares.mean()),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "mean_length": float(np.mean([len(words(t)) for t in texts])),
        "nli_pairs": {label: pairs.count(label) for label in LABEL_SCORES},
        "copy_threshold": COPY_THRESHOLD,
        "bootstrap": {"samples": samples, "seed": seed, "confidence": confidence},
    }


REPORT_COLUMNS = (  # key, title, whether higher is better
    ("c_score", "C-score", True),
    ("contradiction_rate", "Contradiction %", False),
    ("persona_copy_rate", "Persona copy %", None),
    ("distinct_1", "Distinct-1", True),
    ("distinct_2", "Distinct-2", True),
    ("mean_length", "Mean length", None),
)


def metric_cell(report: dict[str, Any], key: str) -> str:
    """One report's value of `key` as a table cell: "12.3 [8.1, 16.0]" with its interval."""
    value = report.get(key)
    if isinstance(value, dict):
        if value["value"] is None:
            return "—"
        low, high = value["interval"]
        return f"{value['value']:.1f} [{low:.1f}, {high:.1f}]"
    return "—" if value is None else f"{value:.1f}"


def response_metrics_markdown(reports: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A row per (name, report): the C-score and the other measures, with their intervals."""
    arrows = {True: " ↑", False: " ↓", None: ""}
    header = ["model", "responses", *(f"{title}{arrows[up]}" for _, title, up in REPORT_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, report in reports:
        cells = [name, str(report["responses"]), *(metric_cell(report, key) for key, _, _ in REPORT_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
