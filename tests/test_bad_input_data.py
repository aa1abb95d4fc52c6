"""Data files that used to end in an internal error or leave traces behind: each gets one line
`pdpo data: <file>[:line]: ...` (exit 2) and writes nothing (docs/bad-input.md, "Data")."""

from __future__ import annotations

import pytest
from bad_input_fixtures import assert_refused, run_cli


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home folder of the test's own, to see that nothing writes a cache into it."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.mark.parametrize("name, line, where", [
    ("deep.jsonl", "[" * 100_000 + "]" * 100_000, ":1"),
    ("deep_object.jsonl", '{"a": ' * 50_000 + "1" + "}" * 50_000, ":1"),
    ("deep.json", '[{"personality": [], "utterances": ' + "[" * 100_000 + "]" * 100_000 + "}]", ""),
])
def test_json_nested_past_the_parser_is_one_line(name, line, where, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(line + "\n")
    status, error, _ = run_cli(["data", "inspect", str(path)], capsys)
    assert_refused(status, error, "data", f"{path}{where}: not valid JSON (nested too deeply)")


@pytest.mark.parametrize("content, message", [
    (bytes(range(256)) * 4, ": invalid UTF-8"),
    (b'[{"personality": ["a"], "utterances": [[[', ":1: not valid JSON"),
    (b"0", "expected a list of dialogues"),
    (b'[{"id": 1}]', "dialogue 1: expected an object with 'personality' and 'utterances'"),
    (b"[]", "no dialogues"),
])
def test_a_local_json_file_that_is_no_personachat_is_one_line_and_writes_no_cache(content, message, tmp_path, home,
                                                                                   capsys):
    path = tmp_path / "dialogues.json"
    path.write_bytes(content)
    status, error, _ = run_cli(["data", "inspect", str(path)], capsys)
    assert_refused(status, error, "data", str(path), message)
    assert "Generating" not in error  # no progress bar
    assert list(home.rglob("*")) == []
