"""inspect_file: the format told by content, counts and first example of every staged file and of a
small file of each other format."""

from __future__ import annotations

import json

import pytest

from pdpo_jax.data import DataError, inspect_file, inspect_files

VALID_DIALOGUES = {"dialogues": 1000, "persona_lines": 4483, "turns": 15602, "examples": 7801}
TRAIN_DIALOGUES = {"dialogues": 1356, "persona_lines": 6093, "turns": 20000, "examples": 10000}
STAGED_DIALOGUES = {
    "personachat/valid_self_original_no_cands.txt": ("fbdialog", VALID_DIALOGUES),
    **{f"personachat/parallel/{role}-val.txt": ("parallel", VALID_DIALOGUES) for role in ("per", "src", "tgt")},
    **{f"personachat/parallel/{role}-train.txt": ("parallel", TRAIN_DIALOGUES) for role in ("per", "src", "tgt")},
}
FIRST_VALID_PERSONA = [
    "i read twenty books a year.", "i'm a stunt double as my second job.", "i only eat kosher.", "i was raised in a single parent household.",
]


@pytest.mark.parametrize("name", sorted(STAGED_DIALOGUES))
def test_staged_dialogue_files(shared_data, name):
    format_name, counts = STAGED_DIALOGUES[name]
    summary = inspect_file(shared_data / name)
    assert json.loads(json.dumps(summary)) == summary
    assert (summary["path"], summary["format"], summary["counts"]) == (str(shared_data / name), format_name, counts)
    first = summary["first_example"]
    assert set(first) == {"id", "dialogue_id", "persona", "history", "response"}
    if "train" in name:
        assert first["persona"][0] == "i like to remodel homes."
        assert first["response"] == "you must be very fast . hunting is one of my favorite hobbies ."
    else:
        assert first["persona"] == FIRST_VALID_PERSONA
        assert first["history"] == ["hello what are doing today ?"]
        assert first["response"] == "i am good , i just got off work and tired , i have two jobs ."
    assert first["id"] == first["dialogue_id"] + "#1"


def spread(total, low, high, mean):
    return {"total": total, "min": low, "max": high, "mean": mean}


def protocol_31(examples):
    return {
        "examples": examples,
        "candidates": spread(31 * examples, 31, 31, 31.0),
        "categories": {
            "hits": spread(examples, 1, 1, 1.0),
            **{category: spread(10 * examples, 10, 10, 10.0) for category in ("contradict", "entail", "rand")},
        },
    }


STAGED_DNLI = {
    ("dnli/valid_havenot.jsonl", "31"): protocol_31(268),
    ("dnli/valid_likedislike.jsonl", "31"): protocol_31(186),
    ("dnli/valid_havenot.jsonl", "all"): {  # one row has 10 "similar" candidates, the rest 11
        "examples": 268,
        "candidates": spread(8843, 32, 33, 32.996),
        "categories": {"hits": spread(268, 1, 1, 1.0), "contradict": spread(2680, 10, 10, 10.0),
                       "entail": spread(2947, 10, 11, 10.996), "rand": spread(2948, 11, 11, 11.0)},
    },
    ("dnli/valid_likedislike.jsonl", "all"): {
        "examples": 186,
        "candidates": spread(5952, 32, 32, 32.0),
        "categories": {"hits": spread(186, 1, 1, 1.0), "contradict": spread(1860, 10, 10, 10.0),
                       "entail": spread(1860, 10, 10, 10.0), "rand": spread(2046, 11, 11, 11.0)},
    },
}


@pytest.mark.parametrize("name, protocol", sorted(STAGED_DNLI))
def test_staged_dnli_files(shared_data, name, protocol):
    summary = inspect_file(shared_data / name, protocol=protocol)
    assert json.loads(json.dumps(summary)) == summary
    assert (summary["format"], summary["protocol"], summary["counts"]) == ("dnli", protocol, STAGED_DNLI[name, protocol])
    record = json.loads((shared_data / name).read_text().splitlines()[0])
    first = summary["first_example"]
    assert first["persona"] == record["persona"] and first["history"] == record["prefix"]  # whole, not cut
    groups = record["candidates"]
    keep = (lambda texts: texts[:10]) if protocol == "31" else (lambda texts: texts)
    assert first["candidates"] == (
        [{"text": groups["label"][0], "category": "hits"}]
        + [{"text": t, "category": "contradict"} for t in keep(groups["neg"])]
        + [{"text": t, "category": "entail"} for t in keep(groups["similar"])]
        + [{"text": t, "category": "rand"} for t in keep(groups["rand"])]
    )
    assert first["relevant_persona_sentence"] == record["relevant_persona_sentence"] and first["triple"] == record["triple"]


def test_staged_nli_pairs(shared_data):
    summary = inspect_file(shared_data / "dnli/pairs/nli-train.txt")
    assert summary == {
        "path": str(shared_data / "dnli/pairs/nli-train.txt"),
        "format": "nli-pairs",
        "counts": {"pairs": 8307, "labels": {"contradiction": 2924, "neutral": 2665, "entailment": 2718}},
        "first_example": {"sentence1": "since my dad is a mechanic we had mostly car books .", "sentence2": "my dad is a priest .",
                          "label": "contradiction", "id": "nli-train:0"},
    }


def test_inspect_files_keeps_the_order(shared_data):
    names = ["dnli/pairs/nli-train.txt", "personachat/parallel/tgt-val.txt"]
    assert [s["format"] for s in inspect_files([shared_data / n for n in names])] == ["nli-pairs", "parallel"]


# --- small files of the other formats -------------------------------------------------------------


def dialogue_summary(summary):
    return summary["format"], summary["counts"], summary["first_example"]


def test_own_jsonl(tmp_path):
    path = tmp_path / "own.jsonl"
    record = {"id": "d1", "persona": ["i like tea ."], "turns": [{"speaker": "partner", "text": "hi"}, {"speaker": "model", "text": "hello"},
                                                                 {"speaker": "partner", "text": "tea ?"}, {"speaker": "model", "text": "yes"}]}
    path.write_text(json.dumps(record) + "\n")
    assert dialogue_summary(inspect_file(path)) == (
        "jsonl",
        {"dialogues": 1, "persona_lines": 1, "turns": 4, "examples": 2},
        {"id": "d1#1", "dialogue_id": "d1", "persona": ["i like tea ."], "history": ["hi"], "response": "hello"},
    )


def test_hf_saved_dataset(tmp_path):
    import datasets

    rows = [{"personality": ["i run .", "i am tall ."], "utterances": [{"history": ["hello"], "candidates": ["x", "hey"]}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    format_name, counts, first = dialogue_summary(inspect_file(tmp_path / "saved"))
    assert (format_name, counts) == ("hf", {"dialogues": 1, "persona_lines": 2, "turns": 2, "examples": 1})
    assert (first["persona"], first["history"], first["response"]) == (["i run .", "i am tall ."], ["hello"], "hey")


def test_jpersonachat_table(tmp_path):
    path = tmp_path / "jpc.tsv"
    rows = ["dialogue_id\tspeaker\ttext", "PP1\tpersona:A\t猫が好き。", "PP1\tpersona:B\t東京に住む。", "PP1\tA\tこんにちは。", "PP1\tB\tどうも。"]
    path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    assert dialogue_summary(inspect_file(path)) == (
        "jpersonachat",
        {"dialogues": 1, "persona_lines": 1, "turns": 2, "examples": 1},
        {"id": "jpc:PP1#1", "dialogue_id": "jpc:PP1", "persona": ["東京に住む。"], "history": ["こんにちは。"], "response": "どうも。"},
    )


def test_jpersonachat_workbook(tmp_path):
    import pandas as pd

    path = tmp_path / "table.xlsx"
    rows = [("PP1", "persona:B", "東京に住む。"), ("PP1", "A", "こんにちは。"), ("PP1", "B", "どうも。")]
    pd.DataFrame(rows, columns=["dialogue_id", "speaker", "text"]).to_excel(path, index=False)
    format_name, counts, first = dialogue_summary(inspect_file(path))
    assert (format_name, counts, first["response"]) == ("jpersonachat", {"dialogues": 1, "persona_lines": 1, "turns": 2, "examples": 1}, "どうも。")


def test_small_fbdialog_and_parallel_files(tmp_path):
    fbdialog = tmp_path / "dialogues.txt"
    fbdialog.write_text("1 your persona: i am tall.\n2 hi\thello\n3 how tall ?\tvery\n")
    for role, text in (("per", "i am tall\ni am tall\n"), ("src", "hi\nhow tall ?\n"), ("tgt", "hello\nvery\n")):
        (tmp_path / f"{role}-test.txt").write_text(text)
    counts = {"dialogues": 1, "persona_lines": 1, "turns": 4, "examples": 2}
    first = {"persona": ["i am tall."], "history": ["hi"], "response": "hello"}
    for path, format_name, dialogue_id in ((fbdialog, "fbdialog", "dialogues:0"), (tmp_path / "tgt-test.txt", "parallel", "per-test:0")):
        expected_first = {"id": f"{dialogue_id}#1", "dialogue_id": dialogue_id, **first}
        assert dialogue_summary(inspect_file(path)) == (format_name, counts, expected_first)


NLI_RECORDS = [
    {"label": "negative", "sentence1": "i have no pets .", "sentence2": "i have a dog .", "triple1": ["i", "have_pet", "none"],
     "triple2": ["i", "have_pet", "dog"], "dtype": "negation", "id": "train_0"},
    {"label": "neutral", "sentence1": "i like tea .", "sentence2": "i have a dog .", "id": "train_1"},
]


@pytest.mark.parametrize("layout", ["array", "lines"])
def test_official_nli_jsonl(tmp_path, layout):
    path = tmp_path / "dialogue_nli_dev.jsonl"
    path.write_text(json.dumps(NLI_RECORDS) + "\n" if layout == "array" else "".join(json.dumps(r) + "\n" for r in NLI_RECORDS))
    summary = inspect_file(path)
    assert (summary["format"], summary["counts"]) == ("nli-pairs", {"pairs": 2, "labels": {"contradiction": 1, "neutral": 1, "entailment": 0}})
    assert summary["first_example"] == {"sentence1": "i have no pets .", "sentence2": "i have a dog .", "label": "contradiction", "id": "train_0"}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.txt", "just some notes\n", "unknown format"),
        ("empty.txt", "\n\n", "empty file"),
        ("table.csv", "a,b\n", "cannot tell the format"),
        ("other.jsonl", json.dumps({"question": "?", "answer": "!"}) + "\n", "unknown JSONL layout"),
    ],
)
def test_unknown_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message) as caught:
        inspect_file(path)
    assert caught.value.path == str(path)


def test_unknown_protocol(shared_data):
    with pytest.raises(ValueError, match="protocol must be one of"):
        inspect_file(shared_data / "dnli/valid_havenot.jsonl", protocol="32")
