"""Readers: staged PersonaChat counts, every supported layout, and bad input naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdpo_jax.data import (
    MODEL,
    PARTNER,
    DataError,
    Dialogue,
    Turn,
    detect_format,
    load_dialogues,
    read_dialogue_jsonl,
    read_fbdialog,
    read_hf_personachat,
    read_jpersonachat,
    write_dialogue_jsonl,
)

PERSONACHAT_VALID = "personachat/valid_self_original_no_cands.txt"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_staged_personachat_validation_counts(shared_data):
    dialogues = load_dialogues(shared_data / PERSONACHAT_VALID)
    assert len(dialogues) == 1000
    assert sum(len(d.persona) for d in dialogues) == 4483
    assert sum(1 for d in dialogues for _ in d.model_turns()) == 7801
    assert len({d.id for d in dialogues}) == 1000
    first = dialogues[0]
    assert first.persona[1] == "i'm a stunt double as my second job."
    assert first.turns[0] == Turn(PARTNER, "hello what are doing today ?")
    assert first.turns[-1] == Turn(MODEL, "now that i am older home depot is my toy r us .")
    assert len(first.turns) == 16 and first.partner_persona is None


BOTH_WITH_CANDIDATES = (
    "1 partner's persona: i like dogs.\n"
    "2 partner's persona: i am a nurse.\n"
    "3 your persona: i like cats.\n"
    "4 your persona: i live in paris.\n"
    "5 hi there !\thello , how are you ?\t\tno|maybe|hello , how are you ?\n"
    "6 good . i am a nurse .\tnice , i love cats .\t\ta|b\n"
    "1 your persona: i am tall.\n"
    "2 __SILENCE__\ti open the conversation .\n"
    "3 oh , hello .\tbye .\n"
)


def test_fbdialog_both_personas_candidates_and_silence(tmp_path):
    dialogues = read_fbdialog(write(tmp_path / "train_both_revised.txt", BOTH_WITH_CANDIDATES))
    assert [d.id for d in dialogues] == ["train_both_revised:0", "train_both_revised:1"]
    first, second = dialogues
    assert first.persona == ("i like cats.", "i live in paris.")
    assert first.partner_persona == ("i like dogs.", "i am a nurse.")
    assert [t.text for t in first.turns] == ["hi there !", "hello , how are you ?", "good . i am a nurse .", "nice , i love cats ."]
    assert [t.speaker for t in second.turns] == [MODEL, PARTNER, MODEL]  # silence: the model opens
    assert [(m.history, m.response) for m in second.model_turns()][0] == ((), "i open the conversation .")


def test_fbdialog_both_speakers_adds_the_partner_view(tmp_path):
    dialogues = read_fbdialog(write(tmp_path / "both.txt", BOTH_WITH_CANDIDATES), both_speakers=True)
    assert [d.id for d in dialogues] == ["both:0", "both:0:partner", "both:1"]  # no partner persona in both:1
    swapped = dialogues[1]
    assert swapped.persona == ("i like dogs.", "i am a nurse.") and swapped.conversation_id == "both:0"
    turns = list(swapped.model_turns())
    assert (turns[0].history, turns[0].response) == ((), "hi there !")
    assert turns[1].history == ("hi there !", "hello , how are you ?") and turns[1].response == "good . i am a nurse ."


def test_own_jsonl_round_trip_and_auto_format(tmp_path):
    dialogues = [
        Dialogue("a", ("i like tea .",), ("i like coffee .",), (Turn(PARTNER, "hi"), Turn(MODEL, "hello"))),
        Dialogue("b", ("p .",), None, (Turn(MODEL, "i speak first"),), conversation_id="a"),
    ]
    path = tmp_path / "own.jsonl"
    write_dialogue_jsonl(path, dialogues)
    assert detect_format(path) == "jsonl"
    loaded = load_dialogues(path)
    assert [(d.id, d.persona, d.partner_persona, d.turns, d.conversation_id) for d in loaded] == [
        (d.id, d.persona, d.partner_persona, d.turns, d.conversation_id) for d in dialogues
    ]
    assert all(d.source == str(path) for d in loaded)


HF_ROWS = [
    {
        "personality": ["i like cats .", "i am a chef ."],
        "utterances": [
            {"history": ["__ silence __"], "candidates": ["wrong", "hi , i cook for a living ."]},
            {"history": ["__ silence __", "hi , i cook for a living .", "nice , what do you cook ?"], "candidates": ["x", "mostly fish ."]},
        ],
    },
    {
        "personality": ["i run ."],
        "utterances": [
            {"history": ["hello"], "candidates": ["hey"]},
            {"history": ["hello", "hey", "do you run ?"], "candidates": ["y", "every day ."]},
        ],
    },
]


def expected_hf_turns():
    return [
        [(MODEL, "hi , i cook for a living ."), (PARTNER, "nice , what do you cook ?"), (MODEL, "mostly fish .")],
        [(PARTNER, "hello"), (MODEL, "hey"), (PARTNER, "do you run ?"), (MODEL, "every day .")],
    ]


def turn_pairs(dialogues):
    return [[(t.speaker, t.text) for t in d.turns] for d in dialogues]


def test_hf_layout_from_json_jsonl_and_saved_datasets(tmp_path):
    import datasets

    cache = tmp_path / "cache"
    splits_file = tmp_path / "personachat_self_original.json"
    splits_file.write_text(json.dumps({"train": HF_ROWS, "valid": HF_ROWS[:1]}))
    lines_file = tmp_path / "rows.jsonl"
    lines_file.write_text("".join(json.dumps(r) + "\n" for r in HF_ROWS))
    train = read_hf_personachat(splits_file, split="train", cache_dir=cache)
    assert turn_pairs(train) == expected_hf_turns()
    assert train[0].persona == ("i like cats .", "i am a chef .") and train[0].id == "personachat_self_original/train:0"
    assert len(read_hf_personachat(splits_file, split="valid", cache_dir=cache)) == 1
    assert turn_pairs(load_dialogues(lines_file, cache_dir=cache)) == expected_hf_turns()
    with pytest.raises(DataError, match="pass split="):
        read_hf_personachat(splits_file, cache_dir=cache)

    dataset = datasets.Dataset.from_list(HF_ROWS)
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"validation": dataset}).save_to_disk(str(tmp_path / "saved_dict"))
    assert turn_pairs(load_dialogues(tmp_path / "saved")) == expected_hf_turns()
    assert turn_pairs(load_dialogues(tmp_path / "saved_dict")) == expected_hf_turns()
    with pytest.raises(DataError, match="split 'train' not found"):
        read_hf_personachat(tmp_path / "saved_dict", split="train")


def test_hf_layout_rejects_inconsistent_history(tmp_path):
    rows = json.loads(json.dumps(HF_ROWS))
    rows[1]["utterances"][0]["candidates"] = ["a different reply"]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"bad.jsonl:2: row 2: utterances\[0\] does not agree"):
        read_hf_personachat(path, cache_dir=tmp_path / "cache")


JP_TSV = (
    "dialogue_id\tspeaker\ttext\n"
    "PP1\tpersona:A\t猫を飼っています。\n"
    "PP1\tpersona:B\t東京に住んでいます。\n"
    "PP1\tpersona:B\t料理が好きです。\n"
    "PP1\tA\tこんにちは。\n"
    "PP1\tB\tこんにちは、\nよろしく。\n"
)


def jp_table_rows():
    return [
        ("PP1", "persona:A", "猫を飼っています。"),
        ("PP1", "persona:B", "東京に住んでいます。"),
        ("PP1", "persona:B", "料理が好きです。"),
        ("PP1", "A", "こんにちは。"),
        ("PP1", "B", "こんにちは、"),
        ("PP1", "B", "よろしく。"),
        ("PP2", "persona:A", "走ります。"),
        ("PP2", "persona:B", "泳ぎます。"),
        ("PP2", "A", "どうも。"),
    ]


def check_jp(dialogues, stem, reply="こんにちは、 よろしく。"):
    first = dialogues[0]
    assert first.id == f"{stem}:PP1"
    assert first.persona == ("東京に住んでいます。", "料理が好きです。") and first.partner_persona == ("猫を飼っています。",)
    assert [(t.speaker, t.text) for t in first.turns] == [(PARTNER, "こんにちは。"), (MODEL, reply)]


def test_jpersonachat_tsv_jsonl_and_xlsx_layouts(tmp_path):
    import pandas as pd

    tsv = tmp_path / "jpc.tsv"
    tsv.write_text("dialogue_id\tspeaker\ttext\n" + "".join("\t".join(r) + "\n" for r in jp_table_rows()), encoding="utf-8")
    check_jp(load_dialogues(tsv), "jpc")

    jsonl = tmp_path / "jpc.jsonl"
    record = {
        "dialogue_id": "PP1", "persona_A": ["猫を飼っています。"], "persona_B": ["東京に住んでいます。", "料理が好きです。"],
        "utterances": [{"speaker": "A", "text": "こんにちは。"}, {"speaker": "B", "text": "こんにちは、"}, {"speaker": "B", "text": "よろしく。"}],
    }
    jsonl.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert detect_format(jsonl) == "jpersonachat"
    check_jp(load_dialogues(jsonl), "jpc")

    table = tmp_path / "table.xlsx"
    pd.DataFrame(jp_table_rows(), columns=["dialogue_id", "speaker", "text"]).to_excel(table, index=False)
    check_jp(load_dialogues(table), "table")

    release = tmp_path / "japanese_persona_chat.xlsx"
    with pd.ExcelWriter(release) as writer:
        pd.DataFrame([["No", "ID", "ペルソナA", "ペルソナB"], [1, "PP1", "猫を飼っています。", "東京に住んでいます。\n料理が好きです。"],
                      [2, "PP2", "走ります。", "泳ぎます。"]]).to_excel(writer, sheet_name="ペルソナリスト", index=False, header=False)
        pd.DataFrame([["No", "ID", "話者", "発話"], [1, "PP1", "A", "こんにちは。"], [2, "PP1", "B", "こんにちは、\nよろしく。"],
                      [3, "PP2", "A", "どうも。"]]).to_excel(writer, sheet_name="対話", index=False, header=False)
    both = read_jpersonachat(release, both_speakers=True)
    check_jp(both, "japanese_persona_chat", reply="こんにちは、よろしく。")  # a line break inside one cell
    assert [d.id for d in both] == ["japanese_persona_chat:PP1", "japanese_persona_chat:PP1:partner",
                                    "japanese_persona_chat:PP2", "japanese_persona_chat:PP2:partner"]
    assert both[1].persona == ("猫を飼っています。",) and list(both[1].model_turns())[0].history == ()
    assert [d.persona for d in read_jpersonachat(release, model_speaker="A")] == [("猫を飼っています。",), ("走ります。",)]


# --- bad input: DataError naming the file and the line --------------------------------------------


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("1 your persona: a.\nhello\tthere\n", 2, "malformed line"),
        ("1 your persona: a.\n2 hello there\n", 2, "missing tab"),
        ("1 your persona: a.\n2 hi\tho\n1 hi\tho\n2 x\ty\n", 3, "dialogue without 'your persona:'"),
        ("1 your persona: a.\n2 hi\tho\n4 x\ty\n", 3, "does not follow 2"),
        ("1 your persona: a.\n2 hi\tho\n3 your persona: b.\n", 3, "persona line after"),
        ("1 your persona: a.\n2 hi\t \n", 2, "empty response"),
        ("2 your persona: a.\n", 1, "starts at index 2"),
    ],
)
def test_fbdialog_bad_input(tmp_path, text, line, message):
    path = write(tmp_path / "bad.txt", text)
    with pytest.raises(DataError, match=message) as caught:
        read_fbdialog(path)
    assert caught.value.path == str(path) and caught.value.line == line
    assert str(caught.value).startswith(f"{path}:{line}: ")


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"1 your persona: a.\n2 hi\tho\n3 caf\xe9\tx\n")
    with pytest.raises(DataError, match="invalid UTF-8") as caught:
        read_fbdialog(path)
    assert caught.value.line == 3
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"id": "a", "persona": ["p"], "turns": [{"speaker": "model", "text": "hi"}]}\n\xff\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid UTF-8"):
        read_dialogue_jsonl(jsonl)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"id": "x", "persona": [], "turns": [{"speaker": "model", "text": "hi"}]}, "'persona' is empty"),
        ({"id": "x", "turns": [{"speaker": "model", "text": "hi"}]}, "missing key 'persona'"),
        ({"id": "x", "persona": ["p"], "turns": [{"speaker": "bot", "text": "hi"}]}, r"turns\[0\]"),
        ({"id": "x", "persona": ["p"], "turns": [{"speaker": "model", "text": "a"}, {"speaker": "model", "text": "b"}]}, "two model turns"),
    ],
)
def test_own_jsonl_bad_records(tmp_path, record, message):
    path = write(tmp_path / "d.jsonl", json.dumps({"id": "ok", "persona": ["p"], "turns": [{"speaker": "model", "text": "hi"}]}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"d.jsonl:2: .*{message}"):
        read_dialogue_jsonl(path)
    write(path, "{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: not valid JSON"):
        read_dialogue_jsonl(path)


def test_jpersonachat_bad_input(tmp_path):
    with pytest.raises(DataError, match=r"a.tsv:3: line has 2 column\(s\); missing tab"):
        read_jpersonachat(write(tmp_path / "a.tsv", "dialogue_id\tspeaker\ttext\nPP1\tpersona:B\tx\nPP1\tA こんにちは\n"))
    with pytest.raises(DataError, match=r"b.tsv:2: dialogue 'PP1' without persona for speaker B"):
        read_jpersonachat(write(tmp_path / "b.tsv", "dialogue_id\tspeaker\ttext\nPP1\tA\tx\nPP1\tB\ty\n"))
    with pytest.raises(DataError, match=r"c.tsv:1: header must name"):
        read_jpersonachat(write(tmp_path / "c.tsv", "id\tspeaker\ttext\n"))


def test_auto_format_refuses_dnli_and_unknown_files(tmp_path):
    assert detect_format("AlekseyKorshuk/persona-chat") == "hf"  # a Hub name; loading it needs the network
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="DNLI evaluation file"):
        load_dialogues(write(tmp_path / "x.jsonl", json.dumps({"prefix": ["a"], "candidates": {}}) + "\n"))
    with pytest.raises(DataError, match="cannot tell the format"):
        load_dialogues(write(tmp_path / "x.csv", "a,b\n"))
