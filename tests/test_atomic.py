import json

import pytest

from pdpo_jax.files import append_jsonl, atomic_write_json, atomic_write_text, is_done, jsonl_objects, mark_done


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "out.json", {"a": 1})
    atomic_write_json(tmp_path / "out.json", {"a": 2})
    assert json.loads((tmp_path / "out.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_append_jsonl_adds_whole_lines(tmp_path):
    path = tmp_path / "records.jsonl"
    append_jsonl(path, {"i": 0})
    append_jsonl(path, {"i": 1, "text": "é"})
    assert [row for _, row in jsonl_objects(path)] == [{"i": 0}, {"i": 1, "text": "é"}]
    path.write_text('{"i": 0}\n{broken\n')
    with pytest.raises(ValueError, match="records.jsonl:2"):
        list(jsonl_objects(path))


def test_done_marker(tmp_path):
    assert not is_done(tmp_path / "sft")
    mark_done(tmp_path / "sft", {"best_step": 3})
    assert is_done(tmp_path / "sft")


def test_atomic_write_gives_the_mode_a_plain_write_would(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert (atomic.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)
