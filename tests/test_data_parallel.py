"""Line-aligned PersonaChat (per-/src-/tgt- files): agreement with the FbDialog file, staged train
counts, detection, and bad input naming the file and line."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pdpo_jax.data import (
    MODEL,
    PARTNER,
    DataError,
    Turn,
    detect_format,
    examples_from_dialogues,
    load_dialogues,
    read_fbdialog,
    read_parallel_personachat,
)

PARALLEL = "personachat/parallel"


def example_fields(examples):
    return [(e.persona, e.history, e.response) for e in examples]


@pytest.mark.parametrize("role", ["per", "src", "tgt"])
def test_staged_validation_files_give_the_fbdialog_examples(shared_data, role):
    parallel = read_parallel_personachat(shared_data / PARALLEL / f"{role}-val.txt")
    fbdialog = read_fbdialog(shared_data / "personachat/valid_self_original_no_cands.txt")
    # No two consecutive validation dialogues share a persona, so every run is one whole dialogue.
    assert len(parallel) == len(fbdialog) == 1000
    assert [d.persona for d in parallel] == [d.persona for d in fbdialog]
    assert [d.turns for d in parallel] == [d.turns for d in fbdialog]
    ours, theirs = examples_from_dialogues(parallel), examples_from_dialogues(fbdialog)
    assert len(ours) == 7801
    assert example_fields(ours) == example_fields(theirs)
    assert [e.id.split("#")[1] for e in ours] == [e.id.split("#")[1] for e in theirs]
    assert ours[0].id == "per-val:0#1" and parallel[17].id == "per-val:17"
    assert parallel[0].source == str(shared_data / PARALLEL / "per-val.txt")


def test_staged_train_files(shared_data):
    dialogues = load_dialogues(shared_data / PARALLEL / "src-train.txt")
    assert len(dialogues) == 1356
    assert sum(len(d.turns) for d in dialogues) == 2 * 10000
    assert len(examples_from_dialogues(dialogues)) == 10000
    runs = Counter(len(d.turns) // 2 for d in dialogues)
    assert sorted(runs.items()) == [(1, 1), (6, 212), (7, 472), (8, 650), (9, 13), (10, 3), (11, 2), (14, 1), (15, 1), (25, 1)]
    first = dialogues[0]
    assert first.persona == ("i like to remodel homes.", "i like to go hunting.", "i like to shoot a bow.", "my favorite holiday is halloween.")
    assert first.turns[:4] == (
        Turn(PARTNER, "hi , how are you doing ? i'm getting ready to do some cheetah chasing to stay in shape ."),
        Turn(MODEL, "you must be very fast . hunting is one of my favorite hobbies ."),
        Turn(PARTNER, "i am ! for my hobby i like to do canning or some whittling ."),
        Turn(MODEL, "i also remodel homes when i am not out bow hunting ."),
    )
    last = dialogues[-1]  # the files stop one line into this dialogue
    assert last.id == "per-train:1355" and len(last.turns) == 2
    (example,) = examples_from_dialogues([last])
    assert example.history == ("hey , do you think its weird to like unicorns as an adult ?",)
    assert example.response == "google makes me think nothing is wierd that's where i work ."
    # A persona sentence ending in "!" still gets the FbDialog period: "i love cooking !."
    assert "i love cooking !." in {s for d in dialogues for s in d.persona}


def write_split(folder: Path, per: str, src: str, tgt: str, split: str = "x") -> Path:
    for role, text in (("per", per), ("src", src), ("tgt", tgt)):
        (folder / f"{role}-{split}.txt").write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return folder / f"per-{split}.txt"


PER = "i like tea</s>i am tall\ni like tea</s>i am tall\ni run\n"
SRC = "hi\nhow tall ?\nhello\n"
TGT = "hello\nvery\nhey\n"


def test_runs_of_one_persona_are_dialogues(tmp_path):
    path = write_split(tmp_path, PER, SRC, TGT)
    first, second = read_parallel_personachat(path)
    assert (first.id, first.persona, first.partner_persona) == ("per-x:0", ("i like tea.", "i am tall."), None)
    assert [t.text for t in first.turns] == ["hi", "hello", "how tall ?", "very"]
    assert second.persona == ("i run.",) and [t.speaker for t in second.turns] == [PARTNER, MODEL]
    assert [d.id for d in read_parallel_personachat(path, both_speakers=True)] == ["per-x:0", "per-x:1"]


def test_detected_by_name_and_siblings(tmp_path):
    path = write_split(tmp_path, PER, SRC, TGT)
    for role in ("per", "src", "tgt"):
        assert detect_format(tmp_path / f"{role}-x.txt") == "parallel"
        assert [d.id for d in load_dialogues(tmp_path / f"{role}-x.txt")] == ["per-x:0", "per-x:1"]
    assert [d.id for d in load_dialogues(path, format="parallel")] == ["per-x:0", "per-x:1"]
    (tmp_path / "tgt-x.txt").unlink()
    assert detect_format(path) == "fbdialog"  # no siblings: an ordinary text file
    with pytest.raises(DataError, match="needs tgt-x.txt beside it"):
        load_dialogues(path, format="parallel")
    with pytest.raises(DataError, match="must start with 'per-'"):
        read_parallel_personachat(tmp_path / "valid.txt")


@pytest.mark.parametrize(
    "per, src, tgt, file, line, message",
    [
        (PER, "hi\nhow tall ?\n", TGT, "src-x.txt", 3, "file ends after 2 lines; per-x.txt has more"),
        (PER, SRC, TGT + "extra\n", "per-x.txt", 4, "file ends after 3 lines; tgt-x.txt has more"),
        (PER, "hi\n\nhello\n", TGT, "src-x.txt", 2, "empty line"),
        (PER, SRC, "hello\nvery\n  \n", "tgt-x.txt", 3, "empty line"),
        ("i like tea</s></s>i am tall\n", "hi\n", "hello\n", "per-x.txt", 1, "empty persona sentence"),
        (PER, b"hi\nhow tall ?\ncaf\xe9\n", TGT, "src-x.txt", 3, "invalid UTF-8"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, per, src, tgt, file, line, message):
    path = write_split(tmp_path, per, src, tgt)
    with pytest.raises(DataError, match=message) as caught:
        read_parallel_personachat(path)
    assert caught.value.path == str(tmp_path / file) and caught.value.line == line
