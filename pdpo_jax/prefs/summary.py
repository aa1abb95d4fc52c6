"""What a finished `<run_dir>/prefs/` reports: counts per split recomputed from the shard files
(so a resumed run reports what one run would), the settings the negatives were drawn with, what
the pair filters dropped (`apply_filters`), and one metrics line per shard written."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pdpo_jax.config import PairFilterSection, RunConfig
from pdpo_jax.storage import atomic_write_json, is_done
from pdpo_jax.generation import sampler_description
from pdpo_jax.prefs.build import PairJob, shard_count
from pdpo_jax.prefs.filters import EntailmentFn, filter_counts, filter_records, filter_settings, pair_filter, write_verdict
from pdpo_jax.prefs.folder import SETTINGS_FILE, SUMMARY_FILE, read_records, read_shard, shard_path
from pdpo_jax.prefs.record import DEGENERATE_REASONS, SPLITS, PreferenceRecord, PrefsError
from pdpo_jax.prefs.side import Side
from pdpo_jax.object_store import as_path

SEED_DERIVATION = "sha256('pdpo-prefs\\0{prefs.seed}\\0{split}\\0{shard}\\0{batch}')[:4] >> 1"


def split_summary(prefs_dir: Path, split: str, jobs: Sequence[PairJob], shard_size: int) -> dict[str, Any]:
    """Counts recomputed from the shard files, so a resumed run reports what one run would."""
    shards = shard_count(len(jobs), shard_size)
    records = [r for k in range(shards) for r in read_shard(shard_path(prefs_dir, split, k))]
    planned = [job.example.id for job in jobs]
    written = {r.example_id for r in records}
    unexpected = written - set(planned)
    if unexpected:
        raise PrefsError(f"{prefs_dir / split}: records for examples not in this split: {sorted(unexpected)[:5]}")
    return {
        "examples": len(jobs),
        "records": len(records),
        "shards": shards,
        "skipped_too_long": [i for i in planned if i not in written],
        "degenerate": {reason: sum(reason in r.degenerate for r in records) for reason in DEGENERATE_REASONS},
        "degenerate_records": sum(bool(r.degenerate) for r in records),
        "dropped": sum(r.dropped for r in records),
        "kept": sum(not r.dropped for r in records),
    }


def run_settings(config: RunConfig, generator: Side, reference: Side, sampler: Any) -> dict[str, Any]:
    """The summary's account of how the negatives were drawn and scored."""
    prefs = config.prefs
    return {
        "shuffled": prefs.shuffle,
        "drop_degenerate": prefs.drop_degenerate,
        "generator": {"path": generator.name, "digest": generator.digest},
        "reference": {"path": reference.name, "digest": reference.digest},
        "sampler": sampler_description(sampler),
        "max_new_tokens": prefs.max_new_tokens,
        "seed": prefs.seed,
        "seed_derivation": SEED_DERIVATION,
    }


def write_summary(prefs_dir: Path, plans: dict[str, list[PairJob]], shard_size: int,
                  settings: dict[str, Any]) -> dict[str, Any]:
    """Counts of every split and `settings`, written to the folder's summary file (the stage then
    marks the folder done with the same summary)."""
    summary = {"splits": {split: split_summary(prefs_dir, split, plans[split], shard_size) for split in SPLITS},
               **settings}
    atomic_write_json(prefs_dir / SUMMARY_FILE, summary)
    return summary


def read_summary(prefs_dir: Path) -> dict[str, Any]:
    return json.loads((prefs_dir / SUMMARY_FILE).read_text(encoding="utf-8"))


def shard_metrics(split: str, shard: int, records: Sequence[PreferenceRecord], seconds: float) -> dict[str, Any]:
    """The metrics.jsonl line of one shard written."""
    return {"split": split, "shard": shard, "records": len(records),
            "degenerate": sum(bool(r.degenerate) for r in records), "seconds": round(seconds, 3)}


def apply_filters(prefs_dir: Path, summary: dict[str, Any], sections: Sequence[PairFilterSection], *,
                  nli: Callable[[str | None], EntailmentFn] | None = None, provenance: dict[str, Any] | None = None,
                  write: bool = True) -> dict[str, Any]:
    """Judges the records the folder keeps with the filters of `sections` (`pdpo_jax.prefs.filters`)
    and returns `summary` with their counts under "filters"; with `write`, writes filters.json, then
    summary.json. The shards are read, never rewritten. `provenance` (e.g. the NLI classifier's
    digest) is recorded in filters.json; `nli(classifier)` may add to it as it opens a classifier."""
    provenance = {} if provenance is None else provenance
    records = {split: [r for k in range(summary["splits"][split]["shards"])
                       for r in read_shard(shard_path(prefs_dir, split, k)) if not r.dropped]
               for split in SPLITS}
    filters = [pair_filter(section, nli) for section in sections]
    verdict = filter_records(records, filters, filter_settings(sections), provenance)
    summary = {**summary, "filters": filter_counts(verdict)}
    if write:
        write_verdict(prefs_dir, verdict)
        atomic_write_json(prefs_dir / SUMMARY_FILE, summary)
    return summary


def filters_line(summary: dict[str, Any], split: str) -> str:
    """"filters keep 40 of 52 (degenerate -3 (flags 3), margin -7 (flags 9))": one split's filter
    counts in a line; each filter's drops (it objected first) and flags (it objected at all)."""
    entry = (summary.get("filters") or {}).get("splits", {}).get(split)
    if entry is None:
        return "no pair filters"
    dropped = ", ".join(f"{kind} -{counts['dropped']} (flags {counts['flagged']})"
                        for kind, counts in entry["filters"].items())
    return f"filters keep {entry['after']} of {entry['before']}" + (f" ({dropped})" if dropped else "")


def is_prefs_folder(path: str | Path) -> bool:
    """Whether `path` is a `make-prefs` folder (it holds settings.json beside split folders)."""
    path = as_path(path)
    return path.is_dir() and (path / SETTINGS_FILE).is_file()


def folder_overview(prefs_dir: str | Path) -> dict[str, Any]:
    """What `pdpo data inspect` shows of a prefs folder: per split the records, those the folder
    keeps and those its filters keep, each filter's counts, and the first pair DPO would read."""
    prefs_dir = as_path(prefs_dir)
    if not is_done(prefs_dir):
        raise PrefsError(f"{prefs_dir}: no DONE marker; the make-prefs stage has not finished (run `pdpo make-prefs`)")
    summary = read_summary(prefs_dir)
    filters = summary.get("filters")
    counts = {}
    for split in SPLITS:
        entry = summary["splits"][split]
        counts[split] = {key: entry[key] for key in ("examples", "records", "degenerate_records", "dropped", "kept")}
        counts[split]["skipped_too_long"] = len(entry["skipped_too_long"])
        if filters is not None:
            counts[split]["after_filters"] = filters["splits"][split]["after"]
    first = next((r.to_json() for split in SPLITS for r in read_records(prefs_dir, split)[:1]), None)
    return {"path": str(prefs_dir), "format": "prefs", "counts": counts,
            "filters": None if filters is None else {"applied": filters["filters"],
                                                     "splits": {s: e["filters"] for s, e in filters["splits"].items()}},
            "first_example": first}
