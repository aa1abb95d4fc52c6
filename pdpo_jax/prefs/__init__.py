"""Pseudo-preference pairs: building them (donor personas, kept histories, sampled negatives),
scoring them under the reference (one row per pair, or one per dialogue tree), the typed record
`make-prefs` writes and DPO reads, and the folder that holds a run's records.

    records = read_records(run_dir / "prefs", "train")      # list[PreferenceRecord], validated
    records[0].persona, records[0].rejected, records[0].ref_chosen_logp
    apply_filters(run_dir / "prefs", summary, config.prefs.filters)   # filters.json: what DPO skips, and why

docs/prefs.md describes the method, the folder and every field of a record.
"""

from pdpo_jax.prefs.build import (
    PairJob,
    batch_records,
    build_shard,
    degenerate_reasons,
    kept_histories,
    plan_split,
    sample_seed,
    shard_count,
    shard_jobs,
)
from pdpo_jax.prefs.filters import FILTERS_FILE, check_filters, filter_settings, read_verdict
from pdpo_jax.prefs.folder import (
    SETTINGS_FILE,
    SHARD_PATTERN,
    SUMMARY_FILE,
    check_settings,
    missing_shards,
    read_preference_pairs,
    read_records,
    read_shard,
    settings_of,
    shard_path,
    write_shard,
)
from pdpo_jax.prefs.record import DEGENERATE_REASONS, SPLITS, PreferenceRecord, PrefsError
from pdpo_jax.prefs.score import CountOnlyFn, ScoreFn, TreeScoreFn, reference_needed, scorer_for_layout
from pdpo_jax.prefs.side import Side
from pdpo_jax.prefs.summary import (apply_filters, folder_overview, read_summary, run_settings, shard_metrics,
                                    split_summary, write_summary)

__all__ = [
    "DEGENERATE_REASONS",
    "FILTERS_FILE",
    "SETTINGS_FILE",
    "SHARD_PATTERN",
    "SPLITS",
    "SUMMARY_FILE",
    "CountOnlyFn",
    "PairJob",
    "PreferenceRecord",
    "PrefsError",
    "ScoreFn",
    "Side",
    "TreeScoreFn",
    "apply_filters",
    "batch_records",
    "build_shard",
    "check_filters",
    "check_settings",
    "degenerate_reasons",
    "filter_settings",
    "folder_overview",
    "kept_histories",
    "missing_shards",
    "plan_split",
    "read_preference_pairs",
    "read_records",
    "read_shard",
    "read_verdict",
    "read_summary",
    "reference_needed",
    "run_settings",
    "sample_seed",
    "scorer_for_layout",
    "settings_of",
    "shard_count",
    "shard_jobs",
    "shard_metrics",
    "split_summary",
    "write_shard",
    "write_summary",
]
