"""Pseudo-preference records: the format `make-prefs` writes and the DPO stage reads.

A finished `<run_dir>/prefs/` holds `train/shard-00000.jsonl, ...` and `val/shard-*.jsonl` (one
record per line, in corpus order), `summary.json` with the counts of every split, and `DONE`.
Every record has exactly the fields of `RECORD_FIELDS`; `read_preference_pairs` checks each one
and names the file and line of the first that is wrong. docs/prefs.md describes every field.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pdpo_jax.errors import PdpoError
from pdpo_jax.storage import is_done

SPLITS = ("train", "val")
DEGENERATE_REASONS = ("empty", "same_as_chosen", "truncated")
SHARD_PATTERN = "shard-{:05d}.jsonl"
SUMMARY_FILE = "summary.json"
LOGP_SLACK = 1e-3  # a sum of log-probs is <= 0; allow float rounding above it


class PrefsError(PdpoError):
    """Preference records that cannot be made or read as asked; the message names the file."""


def shard_path(prefs_dir: str | os.PathLike, split: str, index: int) -> Path:
    return Path(prefs_dir) / split / SHARD_PATTERN.format(index)



def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_logp(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= LOGP_SLACK


# field -> check; every record has exactly these fields
RECORD_FIELDS: dict[str, Any] = {
    "example_id": _is_str,
    "dialogue_id": _is_str,
    "donor_dialogue_id": _is_str,
    "split": lambda v: v in SPLITS,
    "persona": _is_str_list,
    "donor_persona": _is_str_list,
    "history": _is_str_list,
    "history_turns_dropped": _is_count,
    "chosen": _is_str,
    "rejected": _is_str,
    "shuffled": lambda v: isinstance(v, bool),
    "generator": _is_str,
    "generator_digest": lambda v: isinstance(v, str) and v.startswith("sha256:"),
    "reference": _is_str,
    "reference_digest": lambda v: isinstance(v, str) and v.startswith("sha256:"),
    "sampler": lambda v: isinstance(v, dict) and isinstance(v.get("kind"), str),
    "max_new_tokens": _is_count,
    "sample_seed": _is_count,
    "sample_row": _is_count,
    "ref_chosen_logp": _is_logp,
    "ref_rejected_logp": _is_logp,
    "chosen_tokens": lambda v: _is_count(v) and v > 0,
    "rejected_tokens": lambda v: _is_count(v) and v > 0,
    "degenerate": lambda v: isinstance(v, list) and all(r in DEGENERATE_REASONS for r in v),
    "dropped": lambda v: isinstance(v, bool),
}


def validate_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise PrefsError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in RECORD_FIELDS if k not in record]
    if missing:
        raise PrefsError(f"{where}: record lacks field(s) {missing}")
    unknown = sorted(set(record) - set(RECORD_FIELDS))
    if unknown:
        raise PrefsError(f"{where}: unknown field(s) {unknown}")
    for key, check in RECORD_FIELDS.items():
        if not check(record[key]):
            raise PrefsError(f"{where}: field {key!r} has an invalid value {record[key]!r}")
    if record["dropped"] and not record["degenerate"]:
        raise PrefsError(f"{where}: record is marked dropped but not degenerate")
    return record


def read_shard(path: Path) -> list[dict[str, Any]]:
    """Every record of one shard file, validated; errors name the file and line."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path}:{number}"
        if not line.strip():
            raise PrefsError(f"{where}: empty line")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PrefsError(f"{where}: not valid JSON ({err.msg})") from None
        records.append(validate_record(record, where))
    return records


def read_preference_pairs(prefs_dir: str | os.PathLike, split: str, *, include_dropped: bool = False) -> list[dict[str, Any]]:
    """The records of one split of a finished `make-prefs` stage, in corpus order.

    Records marked `dropped` (degenerate negatives under `prefs.drop_degenerate`) are left out
    unless `include_dropped`. Raises PrefsError naming the file and line of the first bad record,
    and when the stage is unfinished, a shard is missing, or the counts disagree with the summary.
    """
    prefs_dir = Path(prefs_dir)
    if split not in SPLITS:
        raise PrefsError(f"split must be one of {SPLITS}, got {split!r}")
    if not is_done(prefs_dir):
        raise PrefsError(f"{prefs_dir}: no DONE marker; the make-prefs stage has not finished (run `pdpo make-prefs`)")
    summary_path = prefs_dir / SUMMARY_FILE
    try:
        expected = json.loads(summary_path.read_text(encoding="utf-8"))["splits"][split]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise PrefsError(f"{summary_path}: unreadable or without counts for split {split!r} ({err!r})") from None
    found = sorted((prefs_dir / split).glob("shard-*.jsonl"))
    wanted = [shard_path(prefs_dir, split, k) for k in range(expected["shards"])]
    if found != wanted:
        missing = sorted(set(wanted) - set(found))
        extra = sorted(set(found) - set(wanted))
        raise PrefsError(f"{prefs_dir / split}: shard files do not match the summary (missing {missing}, unexpected {extra})")
    records, seen = [], {}
    for path in wanted:
        for number, record in enumerate(read_shard(path), 1):
            if record["split"] != split:
                raise PrefsError(f"{path}:{number}: record of split {record['split']!r} in the {split!r} folder")
            if record["example_id"] in seen:
                raise PrefsError(f"{path}:{number}: example {record['example_id']!r} repeats {seen[record['example_id']]}")
            seen[record["example_id"]] = f"{path}:{number}"
            records.append(record)
    if len(records) != expected["records"]:
        raise PrefsError(f"{prefs_dir / split}: {len(records)} records, the summary says {expected['records']}")
    return [r for r in records if include_dropped or not r["dropped"]]
