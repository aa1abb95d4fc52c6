"""DNLI evaluation reader: staged counts, protocols, category mapping, bad rows."""

from __future__ import annotations

import json

import pytest

from pdpo_jax.data import CATEGORIES, DataError, read_dnli

STAGED = {"dnli/valid_havenot.jsonl": 268, "dnli/valid_likedislike.jsonl": 186}


@pytest.mark.parametrize("name, count", sorted(STAGED.items()))
def test_staged_dnli_files(shared_data, name, count):
    path = shared_data / name
    examples = read_dnli(path)
    assert len(examples) == count
    assert all(len(e.candidates) == 31 for e in examples)
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    for example, record in zip(examples, raw):
        categories = [c for _, c in example.candidates]
        assert categories == ["hits"] + ["contradict"] * 10 + ["entail"] * 10 + ["rand"] * 10
        assert example.gold == record["eval_labels"][0] == record["candidates"]["label"][0]
        assert [t for t, c in example.candidates if c == "entail"] == record["candidates"]["similar"][:10]
        assert example.history == tuple(record["prefix"]) and example.persona == tuple(record["persona"])
        assert example.relevant_persona_sentence in example.persona
    every = read_dnli(path, protocol="all")
    assert [len(e.candidates) for e in every] == [sum(len(v) for v in r["candidates"].values()) for r in raw]
    assert len({e.id for e in examples}) == count


def record(**changes):
    base = {
        "persona": ["i have a dog ."],
        "prefix": ["do you have pets ?"],
        "eval_labels": ["yes , a dog ."],
        "triple": ["i", "have_pet", "dog"],
        "candidates": {"label": ["yes , a dog ."], "neg": [f"n{i}" for i in range(11)],
                       "similar": [f"s{i}" for i in range(10)], "rand": [f"r{i}" for i in range(12)]},
        "relevant_persona_sentence": "i have a dog .",
    }
    base.update(changes)
    return json.dumps(base) + "\n"


def test_any_file_of_the_format_and_both_protocols(tmp_path):
    path = tmp_path / "valid_attributes_like.jsonl"
    path.write_text(record() + record(prefix=["a", "b", "c"]))
    short, full = read_dnli(path), read_dnli(path, protocol="all")
    assert [e.id for e in short] == ["valid_attributes_like:0", "valid_attributes_like:1"]
    assert len(short[0].candidates) == 31 and len(full[0].candidates) == 1 + 11 + 10 + 12
    assert {c for _, c in full[0].candidates} == set(CATEGORIES)
    assert short[0].triple == ("i", "have_pet", "dog") and short[1].history == ("a", "b", "c")
    with pytest.raises(ValueError, match="protocol"):
        read_dnli(path, protocol="32")


@pytest.mark.parametrize(
    "bad, message",
    [
        (record(candidates={}), "row without candidates"),
        ('{"persona": ["p"], "prefix": ["h"]}\n', "row without candidates"),
        (record(candidates={"label": ["g"], "neg": ["n"] * 10, "similar": ["s"] * 10}), "no 'rand' group"),
        (record(candidates={"label": ["g"], "neg": ["n"] * 9, "similar": ["s"] * 10, "rand": ["r"] * 10}), "protocol '31' needs 10"),
        (record(persona=[]), "'persona' is empty"),
        ("[1, 2]\n", "expected a JSON object"),
    ],
)
def test_bad_dnli_rows_name_file_and_line(tmp_path, bad, message):
    path = tmp_path / "dnli.jsonl"
    path.write_text(record() + "\n" + bad)
    with pytest.raises(DataError, match=message) as caught:
        read_dnli(path)
    assert caught.value.line == 3 and caught.value.path == str(path)
