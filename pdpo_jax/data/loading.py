"""`load_dialogues`: one entry point that picks the reader from the file name or content.

A data file may be on Cloud Storage (`gs://bucket/data/train.txt`): the line-by-line formats
(fbdialog text, dialogue JSONL) are read from the bucket as they stream, so errors name the gs://
file and line; the others (spreadsheets, parallel files, Hugging Face files) are read from this
host's verified copy (`pdpo_jax.object_store.local_file`)."""

from __future__ import annotations

from pathlib import Path

from pdpo_jax.data.dialogue import Dialogue
from pdpo_jax.data.fbdialog import read_fbdialog
from pdpo_jax.data.hf_personachat import read_hf_personachat
from pdpo_jax.data.jpersonachat import read_jpersonachat
from pdpo_jax.data.jsonl import read_dialogue_jsonl
from pdpo_jax.data.parallel_text import is_parallel_file, read_parallel_personachat
from pdpo_jax.errors import DataError
from pdpo_jax.object_store import as_path, check_bucket, is_object_store, local_file, reported
from pdpo_jax.storage import json_lines

FORMATS = ("auto", "fbdialog", "hf", "jpersonachat", "jsonl", "parallel")


def detect_format(path: str | Path) -> str:
    """The reader for `path`: "parallel" for a `per-`/`src-`/`tgt-` file with its two siblings, else by
    extension, or for `.jsonl` by the keys of the first record."""
    path = as_path(path)
    with reported(path):
        is_dir, exists = path.is_dir(), path.exists()
    if is_dir:
        return "hf"
    if not exists:
        if is_object_store(path):
            check_bucket(path)  # a missing bucket is named as such
            raise FileNotFoundError(f"no such object: {path}")
        name = str(path)
        if name.count("/") == 1 and not name.startswith((".", "/", "~")) and not path.suffix:
            return "hf"  # a Hub name such as owner/dataset
        raise FileNotFoundError(f"no such file or directory: {path}")
    if is_parallel_file(path):
        return "parallel"
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return "fbdialog"
    if suffix in (".xlsx", ".xlsm", ".tsv"):
        return "jpersonachat"
    if suffix == ".json":
        return "hf"
    if suffix == ".jsonl":
        for number, record in json_lines(path):
            if "turns" in record:
                return "jsonl"
            if "utterances" in record and "personality" in record:
                return "hf"
            if "dialogue_id" in record:
                return "jpersonachat"
            if "prefix" in record and "candidates" in record:
                raise DataError(path, number, "this is a DNLI evaluation file; read it with read_dnli")
            raise DataError(path, number, f"unknown JSONL layout (keys {sorted(record)})")
        raise DataError(path, None, "empty file")
    raise DataError(path, None, f"cannot tell the format from the extension {suffix!r}; pass format=")


def load_dialogues(path: str | Path, format: str = "auto", both_speakers: bool = False, **options) -> list[Dialogue]:
    """Dialogues from any supported source. `options` go to the reader (`split`, `cache_dir` for
    "hf"; `model_speaker` for "jpersonachat")."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
    if format == "auto":
        format = detect_format(path)
    readers = {
        "fbdialog": read_fbdialog,
        "hf": read_hf_personachat,
        "jpersonachat": read_jpersonachat,
        "jsonl": read_dialogue_jsonl,
        "parallel": read_parallel_personachat,
    }
    if is_object_store(path) and format not in ("fbdialog", "jsonl"):
        path = local_file(path)
    return readers[format](path, both_speakers=both_speakers, **options)
