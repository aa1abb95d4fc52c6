"""A human study's items and database: built from a judge output folder or two responses files,
annotators with hashed link tokens, stored side orders, votes with their history, resuming, export."""

from __future__ import annotations

import json
import sqlite3

import pytest
from annotation_fixtures import pair_items, write_judge_output, write_responses_file

from pdpo_jax import cli
from pdpo_jax.annotation.errors import StudyError
from pdpo_jax.annotation.items import sample_items, study_items
from pdpo_jax.annotation.store import Study, token_digest
from pdpo_jax.stages import annotate


@pytest.fixture
def study(tmp_path):
    return Study.create(tmp_path / "study.db", pair_items(6))


def test_items_are_the_pairs_the_judge_saw_with_its_model_order(tmp_path):
    items = pair_items(4)
    folder = write_judge_output(tmp_path / "judge", items, ["win", "lose", None, "draw"], swapped=frozenset({1}))
    built = study_items([str(folder)])
    assert [(i.id, i.model_a, i.model_b) for i in built] == [
        (items[0].id, "PseudoDPO", "SFT"), (items[1].id, "SFT", "PseudoDPO"),
        (items[2].id, "PseudoDPO", "SFT"), (items[3].id, "PseudoDPO", "SFT")]
    assert built[1].response_a == items[1].response_b and built[1].response_b == items[1].response_a
    assert built[0] == items[0]


def test_items_from_two_responses_files_and_a_renamed_model(tmp_path):
    items = pair_items(3)
    a = write_responses_file(tmp_path / "dpo.jsonl", "PseudoDPO", items, "a")
    b = write_responses_file(tmp_path / "sft.jsonl", "SFT", items[:2], "b")
    assert study_items([str(a), str(b)]) == items[:2]  # the ids both files answer
    renamed = study_items([f"wo-shuffle={a}", str(b)])
    assert {i.model_a for i in renamed} == {"wo-shuffle"}
    with pytest.raises(StudyError, match="--pairs takes a judge output folder, or two responses files"):
        study_items([str(a)])


def test_bad_judge_outputs_are_named(tmp_path):
    folder = write_judge_output(tmp_path / "judge", pair_items(2), ["win", "lose"])
    (folder / "judgments.jsonl").write_text('{"id": "x", "model_a": "PseudoDPO", "model_b": "SFT", "outcome": "won"}\n')
    with pytest.raises(StudyError, match=r"judgments.jsonl:1: key 'outcome' must be one of"):
        study_items([str(folder)])
    (folder / "judgments.jsonl").write_text('{"id": "dialogue-0#1", "model_a": "PseudoDPO", "model_b": "SFT"}\n'
                                            '{"id": 3, "model_a": "PseudoDPO", "model_b": "SFT"}\n')
    with pytest.raises(StudyError, match=r"judgments.jsonl:2: key 'id' must be a string"):
        study_items([str(folder)])
    (folder / "judgments.jsonl").write_text('{"id": "nope", "model_a": "PseudoDPO", "model_b": "SFT"}\n')
    with pytest.raises(StudyError, match=r"a.jsonl: no response with id 'nope'"):
        study_items([str(folder)])
    results = json.loads((folder / "judge_results.json").read_text())
    results["responses"][0]["path"] = str(tmp_path / "gone.jsonl")
    (folder / "judge_results.json").write_text(json.dumps(results))
    with pytest.raises(StudyError, match=r"the responses file of 'PseudoDPO', .*gone.jsonl, is not there"):
        study_items([str(folder)])


def test_sample_is_seeded_and_keeps_the_order():
    items = pair_items(10)
    picked = sample_items(items, 4, seed=3)
    assert picked == sample_items(items, 4, seed=3) != sample_items(items, 4, seed=4)
    assert len(picked) == 4 and [items.index(i) for i in picked] == sorted(items.index(i) for i in picked)
    assert sample_items(items, 20, seed=0) == items
    with pytest.raises(StudyError, match="--sample must be at least 1"):
        sample_items(items, 0, seed=0)


def test_a_study_is_created_once_and_checked_when_opened(tmp_path, study):
    with pytest.raises(StudyError, match="exists already"):
        Study.create(study.path, pair_items(2))
    with pytest.raises(StudyError, match="no study database here"):
        Study(tmp_path / "missing.db")
    (tmp_path / "text.db").write_text("not sqlite at all, just text" * 100)
    with pytest.raises(StudyError, match="not a study database"):
        Study(tmp_path / "text.db")
    with pytest.raises(StudyError, match="language must be one of"):
        Study.create(tmp_path / "fr.db", pair_items(2), language="fr")
    with sqlite3.connect(study.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert [i for _, i in study.items()] == pair_items(6)


def test_only_the_tokens_hash_is_stored_and_a_reissued_link_replaces_the_old(study):
    token = study.add_annotator("alice")
    assert study.annotator_for_token(token).name == "alice"
    raw = b"".join(p.read_bytes() for p in study.path.parent.glob("study.db*"))
    assert token.encode() not in raw and token_digest(token).encode() in raw
    assert study.annotator_for_token(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert study.annotator_for_token("../../etc/passwd") is None
    annotator = study.annotator_for_token(token)
    study.record_vote(annotator, 1, "draw")
    new = study.add_annotator("alice", reissue=True)
    assert study.annotator_for_token(token) is None and study.annotator_for_token(new) == annotator
    assert study.progress(annotator).done == 1
    with pytest.raises(StudyError, match="annotator 'alice' exists already; --reissue"):
        study.add_annotator("alice")
    with pytest.raises(StudyError, match="no annotator named 'bob' to reissue"):
        study.add_annotator("bob", reissue=True)
    for bad in ("", " alice", "a\nb", "x" * 65):
        with pytest.raises(StudyError, match="annotator name"):
            study.add_annotator(bad)


def test_sides_and_order_are_random_per_annotator_and_stored(tmp_path):
    study = Study.create(tmp_path / "big.db", pair_items(40))
    views = {}
    for name in ("alice", "bob"):
        annotator = study.annotator_for_token(study.add_annotator(name))
        views[name] = [study.shown_item(annotator, p) for p in range(1, 41)]
        assert sorted(s.number for s in views[name]) == list(range(1, 41))
        assert 5 < sum(s.a_first for s in views[name]) < 35  # both sides occur
        assert [study.shown_item(annotator, p) for p in range(1, 41)] == views[name]  # stored, not redrawn
    assert [s.number for s in views["alice"]] != [s.number for s in views["bob"]]
    sides = {name: {s.number: s.a_first for s in view} for name, view in views.items()}
    assert sides["alice"] != sides["bob"]
    shown = views["alice"][0]
    first, second = shown.shown_models
    assert shown.shown_responses[0] == (shown.item.response_a if first == shown.item.model_a else shown.item.response_b)
    assert shown.winner("1") == first and shown.winner("2") == second and shown.winner("draw") == "draw"


def test_votes_resume_change_and_keep_their_history(study):
    annotator = study.annotator_for_token(study.add_annotator("alice"))
    assert study.progress(annotator).next_open == 1
    for position, choice in ((1, "1"), (2, "2"), (4, "draw")):
        study.record_vote(annotator, position, choice)
    progress = study.progress(annotator)
    assert (progress.done, progress.total, progress.next_open) == (3, 6, 3)
    shown, after = study.record_vote(annotator, 2, "1")  # a change
    assert shown.choice == "1" and after.next_open == 3 and after.done == 3
    study.record_vote(annotator, 2, "1")  # the same choice again adds nothing
    assert study.record_vote(annotator, 7, "1") is None
    with pytest.raises(StudyError, match="choice must be one of"):
        study.record_vote(annotator, 1, "3")
    history = study.votes(history=True)
    assert len(history) == 4 and [v.current for v in history] == [True, False, True, True]
    current = study.votes()
    assert [v.winner for v in current] == [study.shown_item(annotator, p).winner(c) for p, c in ((1, "1"), (4, "draw"), (2, "1"))]
    assert study.shown_item(annotator, 2).choice == "1"
    for position in (3, 5, 6):
        study.record_vote(annotator, position, "draw")
    assert study.progress(annotator).next_open is None


def test_the_command_line_from_init_to_export(tmp_path, capsys):
    items = pair_items(5)
    folder = write_judge_output(tmp_path / "judge", items, ["win"] * 5)
    db = tmp_path / "study.db"
    assert annotate.main(["init", "--db", str(db), "--pairs", str(folder), "--sample", "3", "--language", "ja"]) == 0
    assert "3 items comparing PseudoDPO, SFT" in capsys.readouterr().out
    study = Study(db)
    assert study.language == "ja" and len(study.items()) == 3
    assert annotate.main(["add-annotator", "--db", str(db), "alice", "--url", "http://lab.example:9000/"]) == 0
    link = capsys.readouterr().out.strip()
    assert link.startswith("http://lab.example:9000/a/") and link.endswith("/")
    annotator = study.annotator_for_token(link.split("/")[-2])
    study.record_vote(annotator, 1, "2")
    study.record_vote(annotator, 1, "draw")
    study.record_vote(annotator, 2, "1")
    out = tmp_path / "votes.jsonl"
    assert annotate.main(["export", "--db", str(db), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["winner"] for r in rows] == ["draw", study.shown_item(annotator, 2).shown_models[0]]
    first = study.shown_item(annotator, 1)
    assert rows[0] == {"item": first.number, "id": first.item.id, "annotator": "alice",
                       "shown": list(first.shown_models), "winner": "draw", "time": rows[0]["time"]}
    assert annotate.main(["export", "--db", str(db), "--out", str(out), "--history"]) == 0
    assert [json.loads(line)["current"] for line in out.read_text().splitlines()] == [False, True, True]
    with pytest.raises(StudyError, match="exists already"):
        annotate.main(["init", "--db", str(db), "--pairs", str(folder)])


def test_study_errors_reach_the_user_as_one_line(tmp_path, capsys):
    for argv, fragment in (
        (["serve", "--db", str(tmp_path / "none.db")], "none.db: no study database here"),
        (["init", "--db", str(tmp_path / "s.db"), "--pairs", str(tmp_path / "missing.jsonl"), "x.jsonl"],
         "responses file not found"),
        (["report", "--db", str(tmp_path / "none.db"), "--out", "r.json"], "no study database here"),
        (["add-annotator", "--db", str(tmp_path / "none.db")], "the following arguments are required: name"),
    ):
        assert cli.main(["annotate", *argv]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith("pdpo annotate: ") and fragment in error, error
