"""`pdpo data inspect` over random bytes and over truncations of the staged real files: every input
gets a JSON summary (exit 0) or one line `pdpo data: <file>[:line]: ...` (exit 2), in bounded time,
with nothing written outside the test's folder (docs/bad-input.md, "Data")."""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import pytest
from bad_input_fixtures import assert_refused, run_cli
from conftest import SHARED_DATA
from fuzz_fixtures import examples
from hypothesis import given, settings
from hypothesis import strategies as st

SECONDS_PER_FILE = 20.0  # the largest staged file is read whole in ~1 s; a loaded machine is slower
SUFFIXES = [".txt", ".json", ".jsonl", ".tsv", ".xlsx", ".yaml", ""]
# The staged files (relative to the data folder) and how far into each a truncation may cut: the
# first 200 kB keeps an example quick and still cuts inside dialogues, records and lines.
REAL_FILES = ["personachat/valid_self_original_no_cands.txt", "dnli/valid_havenot.jsonl",
              "dnli/valid_likedislike.jsonl", "dnli/pairs/nli-train.txt"]
PARALLEL = ["per-val.txt", "src-val.txt", "tgt-val.txt"]
CUT_WITHIN = 200_000


def inspect(path: Path, capsys, names: str | None = None) -> None:
    """`pdpo data inspect PATH`: a summary, or one line naming the file (`names`: part of its name)."""
    status, error, seconds = run_cli(["data", "inspect", str(path)], capsys)
    assert seconds < SECONDS_PER_FILE, seconds
    if status == 0:
        assert error == "" or "Traceback" not in error
        return
    assert_refused(status, error, "data", names or path.name)


@pytest.fixture(autouse=True)
def _home_elsewhere(tmp_path_factory, monkeypatch):
    """A home folder of the test's own, to see that no reader writes a cache into it."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    yield
    assert [p.name for p in home.rglob("*")] == []


@settings(max_examples=examples())
@given(data=st.binary(max_size=4096), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_get_a_summary_or_one_line(data, suffix, capsys):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"random{suffix}"
        path.write_bytes(data)
        inspect(path, capsys)


@settings(max_examples=examples())
@given(lines=st.lists(st.sampled_from(["[" * 5000, "{\"a\": " * 3000, "1 your persona: i like cats .",
                                       "1 hi\tthere", "\ufeff", "\x00", "{}", "[]", "null", '{"turns": 5}',
                                       '{"prefix": [], "candidates": "x"}', "a</s>b</s>positive", "a</s>b"]),
                       min_size=1, max_size=6),
       suffix=st.sampled_from([".txt", ".json", ".jsonl"]))
def test_odd_lines_get_a_summary_or_one_line(lines, suffix, capsys):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"odd{suffix}"
        path.write_text("\n".join(lines), encoding="utf-8")
        inspect(path, capsys)


@functools.lru_cache(maxsize=None)
def head(name: str) -> bytes:
    """The first CUT_WITHIN bytes of a staged file (read once)."""
    with open(SHARED_DATA / name, "rb") as handle:
        return handle.read(CUT_WITHIN)


@pytest.fixture(scope="module")
def staged() -> None:
    if not (SHARED_DATA / REAL_FILES[0]).exists():
        pytest.skip(f"staged data not found at {SHARED_DATA} (set PDPO_SHARED_DATA to its folder)")


@settings(max_examples=examples())
@given(name=st.sampled_from(REAL_FILES), cut=st.integers(0, CUT_WITHIN), tail=st.binary(max_size=8))
def test_a_truncated_real_file_gets_a_summary_or_one_line(staged, name, cut, tail, capsys):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(name).name
        path.write_bytes(head(name)[:cut] + tail)
        inspect(path, capsys)


@settings(max_examples=examples(0.5))
@given(cuts=st.tuples(*[st.integers(0, CUT_WITHIN)] * 3))
def test_truncated_parallel_files_get_a_summary_or_one_line(staged, cuts, capsys):
    with tempfile.TemporaryDirectory() as folder:
        for name, cut in zip(PARALLEL, cuts):
            (Path(folder) / name).write_bytes(head(f"personachat/parallel/{name}")[:cut])
        inspect(Path(folder) / PARALLEL[1], capsys, names="-val.txt")


def test_an_untouched_real_file_gets_its_summary(staged, capsys):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "valid_havenot.jsonl"
        shutil.copy(SHARED_DATA / "dnli" / "valid_havenot.jsonl", path)
        status, _, _ = run_cli(["data", "inspect", str(path)], capsys)
        assert status == 0
