"""`pdpo eval-responses`' measures: the C-score of a hand-worked example, the contradiction and
persona-copy rates, distinct-n and length, the bootstrap intervals, and the reader's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdpo_jax.evaluate.dnli_stats import bootstrap_indices
from pdpo_jax.evaluate.response_metrics import (ModelResponse, ResponseMetricsError, c_score_of, distinct_n,
                                                read_response_file, response_metrics, response_metrics_markdown,
                                                words)

# Three responses; the classifier's labels of each persona sentence are given, as the classifier
# would return them, so every number below can be worked out by hand.
RESPONSES = [
    ModelResponse("a", ("i love cats .", "i live in paris .", "i am a chef ."), "i love cats ! do you ?", "M"),
    ModelResponse("b", ("i have two dogs .", "i am tall ."), "i do not have dogs .", "M"),
    ModelResponse("c", ("my car is red .",), "hello there , hello .", "M"),
]
LABELS = [
    ["entailment", "neutral", "neutral"],  # (+1 + 0 + 0) / 3 = 1/3
    ["contradiction", "entailment"],  # (-1 + 1) / 2 = 0
    ["neutral"],  # 0
]


def test_c_score_of_a_hand_worked_example():
    assert c_score_of(LABELS[0]) == pytest.approx(1 / 3)
    assert c_score_of(LABELS[1]) == 0.0
    assert c_score_of(["contradiction", "contradiction"]) == -1.0
    report = response_metrics(RESPONSES, LABELS, samples=200, seed=0)
    # mean over responses of the per-response means, x 100: (1/3 + 0 + 0) / 3 * 100 = 11.11
    assert report["c_score"]["value"] == pytest.approx(100 / 9)
    assert report["nli_pairs"] == {"entailment": 2, "neutral": 3, "contradiction": 1}
    # one response of three has a contradicted sentence
    assert report["contradiction_rate"]["value"] == pytest.approx(100 / 3)
    # "i love cats ! do you ?" holds both word pairs of "i love cats ." -> copies; the others none
    assert report["persona_copy_rate"]["value"] == pytest.approx(100 / 3)
    assert report["model"] == "M" and report["responses"] == report["scored"] == 3


def test_persona_copy_of_the_second_response_is_worked_out_by_hand():
    # "i have two dogs ." has the pairs (i have) (have two) (two dogs); "i do not have dogs ." holds
    # none of them, "i am tall ." has (i am) (am tall): none. So its largest share is 0, and the
    # mean persona copy of the three responses is (1 + 0 + 0) / 3.
    report = response_metrics(RESPONSES, LABELS, samples=50, seed=0)
    assert report["mean_persona_copy"] == pytest.approx(1 / 3)


def test_distinct_n_and_length_count_words_and_punctuation():
    assert words("Hello there, hello.") == ["hello", "there", ",", "hello", "."]
    texts = ["hello there , hello .", "hello there"]
    # unigrams: hello there , hello . hello there -> 7, distinct {hello, there, ",", "."} = 4
    assert distinct_n(texts, 1) == pytest.approx(100 * 4 / 7)
    # bigrams within each text: (hello there) (there ,) (, hello) (hello .) + (hello there) -> 5, distinct 4
    assert distinct_n(texts, 2) == pytest.approx(100 * 4 / 5)
    assert distinct_n([""], 2) == 0.0
    report = response_metrics(RESPONSES, LABELS, samples=50, seed=0)
    lengths = [7, 6, 5]  # "i love cats ! do you ?", "i do not have dogs .", "hello there , hello ."
    assert report["mean_length"] == pytest.approx(np.mean(lengths))


def test_intervals_are_the_percentiles_of_the_resampled_means():
    samples, seed = 300, 4
    report = response_metrics(RESPONSES, LABELS, samples=samples, seed=seed)
    per_response = np.asarray([100 / 3, 0.0, 0.0])
    draws = bootstrap_indices(["all"] * 3, samples, seed)
    expected = np.percentile(per_response[draws].mean(axis=1), [2.5, 97.5])
    assert report["c_score"]["interval"] == pytest.approx(list(expected))
    low, high = report["c_score"]["interval"]
    assert low <= report["c_score"]["value"] <= high
    assert report["bootstrap"] == {"samples": samples, "seed": seed, "confidence": 0.95}


def test_a_response_without_persona_is_left_out_of_the_consistency_measures():
    responses = [*RESPONSES, ModelResponse("d", (), "i love cats", "M")]
    report = response_metrics(responses, [*LABELS, []], samples=50, seed=0)
    assert report["scored"] == 3 and report["responses"] == 4
    assert report["c_score"]["value"] == pytest.approx(100 / 9)


def test_markdown_row_shows_values_with_intervals():
    report = response_metrics(RESPONSES, LABELS, samples=50, seed=0)
    table = response_metrics_markdown([("PseudoDPO", report)])
    assert "| PseudoDPO | 3 | 11.1 [" in table and "C-score ↑" in table


def test_reader_names_file_and_line(tmp_path):
    good = {"id": "x", "persona": ["i am a chef ."], "history": [], "response": "hi", "model": "SFT"}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "y", "persona": "i am a chef ."}) + "\n")
    with pytest.raises(ResponseMetricsError, match=r"r.jsonl:2: 'persona' must be a list of strings"):
        read_response_file(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(ResponseMetricsError, match=r"r.jsonl:2: every response needs a unique string 'id'"):
        read_response_file(path)
    path.write_text(json.dumps(good) + "\n")
    assert read_response_file(path) == [ModelResponse("x", ("i am a chef .",), "hi", "SFT")]
