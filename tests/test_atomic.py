import json

import pytest

from pdpo_jax.files import append_jsonl, atomic_write_json, is_done, mark_done, read_jsonl


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "out.json", {"a": 1})
    atomic_write_json(tmp_path / "out.json", {"a": 2})
    assert json.loads((tmp_path / "out.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_jsonl_tolerates_only_a_torn_last_line(tmp_path):
    path = tmp_path / "records.jsonl"
    append_jsonl(path, {"i": 0})
    append_jsonl(path, {"i": 1})
    with open(path, "a") as handle:
        handle.write('{"i": 2, "trunc')
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}]
    path.write_text('{"i": 0}\n{broken\n{"i": 2}\n')
    with pytest.raises(ValueError, match="records.jsonl:2"):
        read_jsonl(path)


def test_done_marker(tmp_path):
    assert not is_done(tmp_path / "sft")
    mark_done(tmp_path / "sft", {"best_step": 3})
    assert is_done(tmp_path / "sft")
