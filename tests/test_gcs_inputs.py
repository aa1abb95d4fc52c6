"""Inputs on `gs://` (data files, DNLI files, models) read like local ones, and bad gs:// input is
one line naming it: a missing bucket, a missing object, an unfinished model directory."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from gcs_fixtures import gcs_bucket, gcs_emulator  # noqa: F401 - fixtures
from pdpo_jax import cli
from pdpo_jax.data import load_dialogues, read_dnli
from pdpo_jax.errors import DataError, ModelDirError
from pdpo_jax.model.loader import resolve_model_dir
from pdpo_jax.object_store import GCS_CACHE_ENV, ObjectStoreError, as_path, default_gcs_cache, filesystem, local_file
from pdpo_jax.storage import commit_directory

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pdpo_jax" / "resources" / "demo"


def upload(local: Path, url: str) -> str:
    filesystem().pipe_file(url[len("gs://"):], local.read_bytes())
    return url


def test_data_and_dnli_files_on_a_bucket_read_as_the_local_ones(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv(GCS_CACHE_ENV, str(tmp_path / "cache"))
    dialogues = upload(DEMO / "dialogues.txt", f"{gcs_bucket}/data/dialogues.txt")
    dnli = upload(DEMO / "dnli_eval.jsonl", f"{gcs_bucket}/data/dnli_eval.jsonl")
    from_bucket, from_disk = load_dialogues(dialogues), load_dialogues(DEMO / "dialogues.txt")
    assert {d.source for d in from_bucket} == {dialogues} and {d.source for d in from_disk} == {str(DEMO / "dialogues.txt")}
    assert [replace(d, source="") for d in from_bucket] == [replace(d, source="") for d in from_disk]
    from_bucket, from_disk = read_dnli(dnli, protocol="all"), read_dnli(DEMO / "dnli_eval.jsonl", protocol="all")
    assert [replace(e, source="") for e in from_bucket] == [replace(e, source="") for e in from_disk]
    assert {e.source for e in from_bucket} == {dnli}
    copy = local_file(dialogues)  # what readers of spreadsheets and archives get: a verified local copy
    assert copy.read_bytes() == (DEMO / "dialogues.txt").read_bytes() and str(copy).startswith(str(tmp_path))


def test_a_bad_line_or_a_missing_object_on_a_bucket_is_named(gcs_bucket):
    filesystem().pipe_file(f"{gcs_bucket[5:]}/bad.jsonl", b'\n{"persona": \n')
    with pytest.raises(DataError, match=rf"^{gcs_bucket}/bad.jsonl:2: not valid JSON"):
        list(read_dnli(f"{gcs_bucket}/bad.jsonl"))
    with pytest.raises(FileNotFoundError, match=rf"no such object: {gcs_bucket}/missing.txt"):
        load_dialogues(f"{gcs_bucket}/missing.txt")
    with pytest.raises(ObjectStoreError, match=rf"^{gcs_bucket}/data/missing.xlsx: no such object"):
        local_file(f"{gcs_bucket}/data/missing.xlsx")


def test_a_model_directory_is_read_only_once_committed(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv(GCS_CACHE_ENV, str(tmp_path / "cache"))
    best = f"{gcs_bucket}/run/sft/best"
    fs = filesystem()
    fs.pipe_file(f"{best[5:]}.tmp-host-1-abc/config.json", b"{}")  # a save in progress: not there yet
    with pytest.raises(ModelDirError, match=rf"^{best}: model directory not found \(or not committed"):
        resolve_model_dir(best)
    with commit_directory(best) as building:
        (building / "config.json").write_text('{"model_type": "llama"}')
        (building / "tokenizer.json").write_text("{}")
    local = resolve_model_dir(best)
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "tokenizer.json"]  # no marker
    assert (local / "config.json").read_text() == '{"model_type": "llama"}'
    with commit_directory(best) as building:  # replaced: the copy follows, changed files only
        (building / "config.json").write_text('{"model_type": "qwen2"}')
    assert sorted(p.name for p in resolve_model_dir(best).iterdir()) == ["config.json"]
    assert (local / "config.json").read_text() == '{"model_type": "qwen2"}'


def test_a_run_dir_in_a_missing_bucket_is_one_line_and_nothing_is_written(gcs_emulator, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # pathlib once folded gs:// into a local gs:/ folder here
    status = cli.main(["make-prefs", "--config", str(REPO / "configs" / "demo.yaml"), "run_dir=gs://no-such-bucket/demo"])
    error = capsys.readouterr().err
    assert status == 2 and error.count("\n") == 1, error
    assert error.startswith("pdpo make-prefs: gs://no-such-bucket/demo: the bucket gs://no-such-bucket does not exist")
    assert list(tmp_path.iterdir()) == [] and not as_path("gs://no-such-bucket/demo").exists()


def test_the_hosts_copies_go_where_pdpo_gcs_cache_dir_says(gcs_emulator, monkeypatch, tmp_path):
    """The tests' copies go to the emulator's temporary folder, never to the user's ~/.cache."""
    assert default_gcs_cache() == gcs_emulator.root / "host-cache"
    assert not str(default_gcs_cache()).startswith(str(Path.home() / ".cache"))
    monkeypatch.delenv(GCS_CACHE_ENV)
    monkeypatch.setenv("PDPO_CACHE_DIR", str(tmp_path / "pdpo"))
    assert default_gcs_cache() == tmp_path / "pdpo" / "gcs"
    monkeypatch.setenv(GCS_CACHE_ENV, str(tmp_path / "ssd"))
    assert default_gcs_cache() == tmp_path / "ssd"
