"""What a finished `<run_dir>/prefs/` reports: counts per split recomputed from the shard files
(so a resumed run reports what one run would), the settings the negatives were drawn with, and
one metrics line per shard written."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdpo_jax.config import RunConfig
from pdpo_jax.storage import atomic_write_json
from pdpo_jax.generation import sampler_description
from pdpo_jax.prefs.build import PairJob, shard_count
from pdpo_jax.prefs.folder import SUMMARY_FILE, read_shard, shard_path
from pdpo_jax.prefs.record import DEGENERATE_REASONS, SPLITS, PreferenceRecord, PrefsError
from pdpo_jax.prefs.side import Side

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
