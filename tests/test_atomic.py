import json
import multiprocessing
import os
from pathlib import Path

import pytest

from pdpo_jax import storage
from pdpo_jax.storage import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    commit_directory,
    is_done,
    jsonl_objects,
    mark_done,
    recover_directory,
)


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


# --- directories ------------------------------------------------------------------------------------


def write_version(folder, version: int) -> None:
    (folder / "weights.bin").write_bytes(bytes([version]) * 16)
    (folder / "info.json").write_text(json.dumps({"version": version}))


def version_of(folder) -> int:
    info = json.loads((folder / "info.json").read_text())
    assert (folder / "weights.bin").read_bytes() == bytes([info["version"]]) * 16  # never a mix of two copies
    return info["version"]


def test_a_committed_directory_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "best"
    for version in (1, 2):
        with commit_directory(target) as building:
            assert building.parent == tmp_path
            assert version_of(target) == version - 1 if version > 1 else not target.exists()  # untouched meanwhile
            write_version(building, version)
    assert version_of(target) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_an_error_while_building_leaves_the_old_directory(tmp_path):
    target = tmp_path / "best"
    with commit_directory(target) as building:
        write_version(building, 1)
    with pytest.raises(RuntimeError, match="disk full"):
        with commit_directory(target) as building:
            (building / "weights.bin").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert version_of(target) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def _commit_and_die(target: str, step: str) -> None:
    """The child of `crash_at` (module level, so a spawned process can import it)."""
    target = Path(target)
    rename = os.rename

    def killed_before(real, when):
        def call(src, dst):
            if when(src, dst):
                os._exit(3)
            return real(src, dst)
        return call

    if step == "building":
        def build(folder):
            (folder / "weights.bin").write_bytes(b"half")
            os._exit(3)
    else:
        def build(folder):
            write_version(folder, 2)
        if step == "between the renames":  # the old copy is set aside, the new one not yet in place
            os.rename = killed_before(rename, lambda src, dst: str(dst) == str(target))
        else:  # "before the old copy is deleted": the new copy is in place
            storage._sync_directory = lambda path: os._exit(3)
    with commit_directory(target) as building:
        build(building)


def crash_at(target, step: str) -> None:
    """In a child process: commits version 2 of `target` and is killed (no cleanup runs) at `step`.
    The child is spawned, not forked: a fork of a process whose JAX threads hold locks can deadlock."""
    process = multiprocessing.get_context("spawn").Process(target=_commit_and_die, args=(str(target), step))
    process.start()
    process.join()
    assert process.exitcode == 3


@pytest.mark.parametrize("step, left_behind, recovered_version", [
    ("building", ["best", "best.tmp-*"], 1),
    ("between the renames", ["best.old", "best.tmp-*"], 1),
    ("before the old copy is deleted", ["best", "best.old"], 2),
])
def test_a_crash_at_any_step_is_recovered_and_never_loses_the_old_directory(tmp_path, step, left_behind,
                                                                            recovered_version):
    target = tmp_path / "best"
    with commit_directory(target) as building:
        write_version(building, 1)
    crash_at(target, step)
    names = sorted(p.name if storage.BUILDING_INFIX not in p.name else "best.tmp-*" for p in tmp_path.iterdir())
    assert names == left_behind
    recover_directory(target)  # what a reader that finds no best/ does; the next commit does it first too
    assert version_of(target) == recovered_version and sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    with commit_directory(target) as building:
        write_version(building, 3)
    assert version_of(target) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_the_next_commit_recovers_a_crash_between_the_renames_by_itself(tmp_path):
    target = tmp_path / "best"
    with commit_directory(target) as building:
        write_version(building, 1)
    crash_at(target, "between the renames")
    with pytest.raises(RuntimeError):
        with commit_directory(target) as building:
            assert version_of(target) == 1  # put back before anything else happens
            raise RuntimeError("stop")
    assert version_of(target) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_racing_creators_keep_the_first_copy_and_leave_each_other_alone(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(OSError):
        with commit_directory(target, replace=False) as late:
            write_version(late, 1)
            with commit_directory(target, replace=False) as early:
                write_version(early, 2)
            assert late.is_dir()  # a live writer's copy in progress is not another writer's to delete
    assert version_of(target) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(FileExistsError):
        with commit_directory(target, replace=False):
            pass


def test_processes_of_one_save_share_the_directory_one_of_them_commits(tmp_path):
    target = tmp_path / "best"
    with commit_directory(target, tag="all-processes") as building:
        with commit_directory(target, tag="all-processes", commit=False) as other:
            assert other == building
            (other / "weights.bin").write_bytes(bytes([4]) * 16)
        (building / "info.json").write_text(json.dumps({"version": 4}))
    assert version_of(target) == 4
