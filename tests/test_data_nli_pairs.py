"""Dialogue NLI sentence pairs: the staged RCDG text file, the official JSON layouts, bad input."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pdpo_jax.data import NLI_LABELS, DataError, NliPair, read_nli_pairs


def test_staged_text_pairs(shared_data):
    pairs = read_nli_pairs(shared_data / "dnli/pairs/nli-train.txt")
    assert len(pairs) == 8307
    assert Counter(p.label for p in pairs) == {"entailment": 2718, "neutral": 2665, "contradiction": 2924}
    assert pairs[0] == NliPair("since my dad is a mechanic we had mostly car books .", "my dad is a priest .", "contradiction", "nli-train:0")
    assert pairs[2].label == "entailment" and pairs[2].label_index == 2
    assert len({p.id for p in pairs}) == 8307


def official(i, label="positive", **changes):
    record = {
        "label": label, "sentence1": f"i have a dog {i} .", "sentence2": "i have a pet .",
        "triple1": ["i", "have_pet", "dog"], "triple2": ["i", "have_pet", "pet"], "dtype": "matchingtriple_up", "id": f"train_{i}",
    }
    return {**record, **changes}


EXPECTED = [
    NliPair("i have a dog 0 .", "i have a pet .", "entailment", "train_0"),
    NliPair("i have a dog 1 .", "i have a pet .", "contradiction", "train_1"),
    NliPair("i have a dog 2 .", "i have a pet .", "neutral", "train_2"),
]
RECORDS = [official(0), official(1, "negative"), official(2, "neutral")]


def test_official_layouts_one_array_or_one_object_a_line(tmp_path):
    array = tmp_path / "dialogue_nli_train.jsonl"
    array.write_text(json.dumps(RECORDS) + "\n")
    assert read_nli_pairs(array) == EXPECTED
    lines = tmp_path / "pairs.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "\n")
    assert read_nli_pairs(lines) == EXPECTED
    without_ids = tmp_path / "plain.json"  # the layout is told by content, not by the name
    without_ids.write_text(json.dumps([{k: r[k] for k in ("sentence1", "sentence2", "label")} for r in RECORDS]))
    assert [p.id for p in read_nli_pairs(without_ids)] == ["plain:0", "plain:1", "plain:2"]


def test_labels_index_the_classifier_classes():
    assert NLI_LABELS == ("contradiction", "neutral", "entailment")
    assert [p.label_index for p in EXPECTED] == [2, 0, 1]


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("a .</s>b .</s>positive\na .</s>b .\n", 2, "expected 3 fields separated by '</s>', found 2"),
        ("a .</s>b .</s>positive\na .</s>b .</s>maybe\n", 2, "unknown label 'maybe'"),
        ("a .</s>b .</s>positive\n\n </s>b .</s>neutral\n", 3, "empty sentence1"),
        (json.dumps(RECORDS[0]) + "\n" + json.dumps(official(1, sentence2=None)) + "\n", 2, "'sentence2' must be a string"),
        (json.dumps(RECORDS[0]) + "\n{oops\n", 2, "not valid JSON"),
        (json.dumps([RECORDS[0], official(1, "yes")]), 1, "item 1 of the array: unknown label 'yes'"),
        (json.dumps([RECORDS[0], 7]), 1, "item 1 of the array: expected a JSON object, found int"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as caught:
        read_nli_pairs(path)
    assert caught.value.path == str(path) and caught.value.line == line


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not NLI sentence pairs"),
        (b"1 your persona: a.\n", "not NLI sentence pairs"),
        (b"a</s>b</s>\xffpositive\n", "invalid UTF-8"),
        (b"[]\n", "no sentence pairs"),
    ],
)
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "x.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_nli_pairs(path)
