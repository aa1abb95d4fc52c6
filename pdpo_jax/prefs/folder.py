"""The `<run_dir>/prefs/` folder: where shards live, the settings it was made with, and reading it.

    settings.json         what the shards depend on (config subset, model digests); a rerun with
                          different settings refuses to mix its records with these
    train/shard-00000.jsonl, ...   `shard_size` examples each, in corpus order, written atomically
    val/shard-00000.jsonl, ...
    metrics.jsonl         one line per shard written (timing)
    summary.json, DONE    counts (degenerate negatives by reason, dropped, skipped), written last
    filters.json          what `prefs.filters` dropped and why (`pdpo_jax.prefs.filters`); readers
                          leave those pairs out

A shard is one file written whole (on gs://, one upload), so a reader sees all of it or none: a
shard is committed by its own write, and the folder by DONE.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdpo_jax.config import RunConfig, config_to_dict
from pdpo_jax.object_store import as_path
from pdpo_jax.storage import atomic_write_json, atomic_write_text, is_done
from pdpo_jax.prefs.filters import FILTERS_FILE, read_verdict
from pdpo_jax.prefs.record import SPLITS, PreferenceRecord, PrefsError
from pdpo_jax.prefs.score import reference_needed

SHARD_PATTERN = "shard-{:05d}.jsonl"
SETTINGS_FILE = "settings.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"


def shard_path(prefs_dir: str | os.PathLike, split: str, index: int) -> Path:
    return as_path(prefs_dir) / split / SHARD_PATTERN.format(index)


def write_shard(path: Path, records: Sequence[PreferenceRecord]) -> Path:
    """One record per line, atomically: a crash leaves the whole shard or none of it."""
    return atomic_write_text(path, "".join(record.to_json_line() + "\n" for record in records))


def read_shard(path: Path) -> list[PreferenceRecord]:
    """Every record of one shard file, validated; errors name the file and line."""
    return [PreferenceRecord.from_json_line(line, f"{path}:{number}")
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]


def read_records(prefs_dir: str | os.PathLike, split: str, *, include_dropped: bool = False) -> list[PreferenceRecord]:
    """The records of one split of a finished `make-prefs` stage, in corpus order.

    Records marked `dropped` (degenerate negatives under `prefs.drop_degenerate`) and pairs the
    folder's filters dropped (filters.json, `pdpo_jax.prefs.filters`) are left out unless
    `include_dropped`. Raises PrefsError naming the file and line of the first bad record,
    and when the stage is unfinished, a shard is missing, or the counts disagree with the summary.
    """
    prefs_dir = as_path(prefs_dir)
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
            if record.split != split:
                raise PrefsError(f"{path}:{number}: record of split {record.split!r} in the {split!r} folder")
            if record.example_id in seen:
                raise PrefsError(f"{path}:{number}: example {record.example_id!r} repeats {seen[record.example_id]}")
            seen[record.example_id] = f"{path}:{number}"
            records.append(record)
    if len(records) != expected["records"]:
        raise PrefsError(f"{prefs_dir / split}: {len(records)} records, the summary says {expected['records']}")
    filtered = _filtered_out(prefs_dir, split, [r for r in records if not r.dropped])
    return [r for r in records if include_dropped or not (r.dropped or r.example_id in filtered)]


def _filtered_out(prefs_dir: Path, split: str, kept: list[PreferenceRecord]) -> set[str]:
    """The ids the folder's pair filters dropped, checked against the records they judged."""
    verdict = read_verdict(prefs_dir)
    if verdict is None or split not in verdict["splits"]:
        return set()
    entry, ids = verdict["splits"][split], {r.example_id for r in kept}
    strangers = sorted(set(entry["dropped"]) - ids)
    if entry.get("before") != len(kept) or strangers:
        raise PrefsError(f"{prefs_dir / FILTERS_FILE}: made for other records of split {split!r} (judged "
                         f"{entry.get('before')} pairs, the shards keep {len(kept)}; unknown ids {strangers[:3]}); "
                         "delete it and run `pdpo make-prefs` to filter again")
    return set(entry["dropped"])


def read_preference_pairs(prefs_dir: str | os.PathLike, split: str, *,
                          include_dropped: bool = False) -> list[dict[str, Any]]:
    """`read_records` as the JSON objects the shards hold, for callers that want plain dicts."""
    return [record.to_json() for record in read_records(prefs_dir, split, include_dropped=include_dropped)]


def settings_of(config: RunConfig, generator: str, reference: str, digests: dict[str, str] | None) -> dict[str, Any]:
    """Everything the records depend on; equal settings give byte-identical shards. Without
    `digests`, the models are left out of the comparison with earlier settings (see check_settings)."""
    full = config_to_dict(config)
    return {
        "seed": config.seed,
        "data": full["data"],
        # Filters decide which stored pairs DPO reads, not what is stored: changing them re-filters
        # the folder (`pdpo_jax.prefs.filters`) instead of refusing it.
        "prefs": {key: value for key, value in full["prefs"].items() if key != "filters"},
        "model_dtype": config.model.dtype,
        "generator": {"path": generator, "digest": None if digests is None else digests[generator]},
        "reference": {"path": reference, "digest": None if digests is None else digests[reference]},
        "reference_scored": reference_needed(config),
    }


def check_settings(prefs_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Writes settings.json; once shards exist, later runs must match it, or old shards would mix in.
    Returns the settings the folder goes on with: a folder whose records carry reference log-probs
    serves every objective, so it stays scored when the objective needs no reference; one without
    them is refused to an objective that needs them."""
    path = prefs_dir / SETTINGS_FILE
    has_shards = any(prefs_dir.glob("*/shard-*.jsonl")) or is_done(prefs_dir)
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    if old is not None and "prefs" in old:
        old["prefs"].setdefault("layout", "per_turn")  # a folder begun before there was a choice
    if old is not None:
        old.setdefault("reference_scored", True)  # a folder begun before there was a choice
    if old is not None:
        for side in ("generator", "reference"):
            before, now = old.get(side, {}), settings[side]
            if now["digest"] is None or now["digest"] == before.get("digest"):
                # not loaded (left out of the comparison), or the same weights read from another
                # path (a linked or copied model folder): the folder keeps the path it was made from
                settings[side] = dict(before)
    if old is None or not has_shards:
        atomic_write_json(path, settings)
        return settings
    if old["reference_scored"] and not settings["reference_scored"]:
        settings["reference_scored"] = True
    if not old["reference_scored"] and settings["reference_scored"]:
        raise PrefsError(
            f"{path}: this folder's records carry no reference log-probs (it was made for an objective without a "
            f"reference) and dpo.loss_type needs them; delete {prefs_dir} to rebuild it with them"
        )
    if old != settings:
        changed = _first_difference(old, settings)
        raise PrefsError(
            f"{path}: this folder holds records made with other settings ({changed}); delete {prefs_dir} "
            "to rebuild, or run with the original settings to resume"
        )
    return settings


def _first_difference(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: was {old!r}, now {new!r}"


def missing_shards(prefs_dir: Path, shard_counts: dict[str, int]) -> list[tuple[str, int]]:
    """(split, index) of every shard not yet on disk, in the order they are built."""
    return [(split, k) for split, count in shard_counts.items() for k in range(count)
            if not shard_path(prefs_dir, split, k).exists()]
