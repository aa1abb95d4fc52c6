"""Files, stage markers and directory commits on `gs://`, against the local GCS emulator: a file is
one upload, a directory is there only once its COMMITTED marker is (written last), and what a crash
leaves at any step is published or deleted by the next writer, never read."""

from __future__ import annotations

import json

import pytest

from gcs_fixtures import gcs_bucket, gcs_emulator  # noqa: F401 - fixtures
from pdpo_jax import storage
from pdpo_jax.object_store import ObjectStoreError, as_path, check_bucket, create_if_absent, filesystem


def objects_under(url: str) -> dict[str, bytes]:
    fs = filesystem()
    prefix = url[len("gs://"):].rstrip("/")
    return {key[len(prefix) + 1:]: fs.cat_file(key) for key in fs.find(prefix)}


def test_files_and_done_markers_round_trip(gcs_bucket):
    stage = f"{gcs_bucket}/run/sft"
    written = storage.atomic_write_json(f"{stage}/summary.json", {"loss": 1.5, "name": "é"})
    assert str(written) == f"{stage}/summary.json"
    assert json.loads(as_path(f"{stage}/summary.json").read_text()) == {"loss": 1.5, "name": "é"}
    storage.append_jsonl(f"{stage}/metrics.jsonl", {"step": 1})
    storage.append_jsonl(f"{stage}/metrics.jsonl", {"step": 2})
    assert storage.read_jsonl(f"{stage}/metrics.jsonl") == [{"step": 1}, {"step": 2}]
    assert [n for n, _ in storage.text_lines(f"{stage}/metrics.jsonl")] == [1, 2]
    assert not storage.is_done(stage)
    storage.mark_done(stage, {"final_step": 3})
    assert storage.is_done(stage)
    assert (as_path(stage) / "DONE").read_text() == '{\n  "final_step": 3\n}\n'


def test_a_committed_directory_is_published_whole_with_its_marker_last(gcs_bucket):
    target = f"{gcs_bucket}/run/sft/best"
    with storage.commit_directory(target) as building:
        (building / "config.json").write_text("{}")
        (building / "params" / "a").write_text("1")
        assert not storage.is_committed(target)  # nothing is there for a reader while it is built
    assert storage.is_committed(target)
    assert objects_under(target) == {"COMMITTED": b"", "config.json": b"{}", "params/a": b"1"}
    assert objects_under(f"{gcs_bucket}/run/sft").keys() == {f"best/{k}" for k in ("COMMITTED", "config.json", "params/a")}

    with storage.commit_directory(target) as building:  # a replacement drops what the new copy lacks
        (building / "config.json").write_text('{"v": 2}')
    assert objects_under(target) == {"COMMITTED": b"", "config.json": b'{"v": 2}'}


def test_a_failed_build_leaves_the_previous_copy_and_no_leftover(gcs_bucket):
    target = f"{gcs_bucket}/m/best"
    with storage.commit_directory(target) as building:
        (building / "w").write_text("old")
    with pytest.raises(RuntimeError):
        with storage.commit_directory(target) as building:
            (building / "w").write_text("half")
            raise RuntimeError("killed mid-save")
    assert objects_under(f"{gcs_bucket}/m") == {"best/COMMITTED": b"", "best/w": b"old"}


@pytest.mark.parametrize("crash_after", ["build", "staged_marker", "target_marker_removed", "copied"])
def test_a_crash_at_any_step_leaves_the_old_or_the_new_copy_for_the_next_writer(gcs_bucket, crash_after):
    """Simulates each state a kill -9 inside commit_directory can leave, then lets the next writer
    (`recover_directory`) see it: the old copy or the new one is committed, never a mix, and
    nothing is left beside it."""
    fs = filesystem()
    target = f"{gcs_bucket}/m/best"
    with storage.commit_directory(target) as building:
        (building / "w").write_text("old")
        (building / "only-old").write_text("x")
    staged = f"{gcs_bucket}/m/best.tmp-deadhost-1-abc"
    fs.pipe_file(f"{staged[5:]}/w", b"new")
    if crash_after != "build":
        fs.pipe_file(f"{staged[5:]}/COMMITTED", b"")
    if crash_after in ("target_marker_removed", "copied"):
        fs.rm_file(f"{target[5:]}/COMMITTED")
        assert not storage.is_committed(target)  # readers see no best/ from here on
    if crash_after == "copied":
        fs.rm_file(f"{target[5:]}/only-old")
        fs.pipe_file(f"{target[5:]}/w", b"new")
    storage.recover_directory(target)
    expected = {"COMMITTED": b"", "w": b"old", "only-old": b"x"} if crash_after == "build" else {"COMMITTED": b"", "w": b"new"}
    assert objects_under(f"{gcs_bucket}/m") == {f"best/{k}": v for k, v in expected.items()}


def test_first_writer_wins_when_writers_race_to_create(gcs_bucket):
    target = f"{gcs_bucket}/models/imported"
    with storage.commit_directory(target, replace=False) as building:
        (building / "w").write_text("first")
    with pytest.raises(FileExistsError):
        with storage.commit_directory(target, replace=False):
            pass
    assert create_if_absent(f"{gcs_bucket}/x", b"1") is not None
    assert create_if_absent(f"{gcs_bucket}/x", b"2") is None  # the store's precondition decides
    assert filesystem().cat_file(f"{gcs_bucket[5:]}/x") == b"1"


def test_a_missing_bucket_or_object_is_one_line_naming_it(gcs_emulator):
    with pytest.raises(ObjectStoreError, match=r"^gs://no-such-bucket/run: the bucket gs://no-such-bucket does not exist"):
        check_bucket("gs://no-such-bucket/run")
    with pytest.raises(FileNotFoundError):
        list(storage.text_lines("gs://no-such-bucket/data.txt"))


def test_an_unreachable_endpoint_is_one_line(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # the discard port: nothing answers
    import fsspec

    fsspec.filesystem("gs").clear_instance_cache()
    try:
        with pytest.raises(ObjectStoreError, match=r"^gs://b/run: cannot reach the storage emulator at http://127.0.0.1:9"):
            check_bucket("gs://b/run")
    finally:
        fsspec.filesystem("gs").clear_instance_cache()
