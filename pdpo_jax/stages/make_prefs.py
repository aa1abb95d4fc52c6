"""`pdpo make-prefs`: pseudo-preference pairs with swapped personas, resumable shard by shard.

The glue between the `prefs` config section and `pdpo_jax.prefs`: it opens the generator and the
reference on the run's mesh, checks the folder's settings, and builds the missing shards of
`<run_dir>/prefs/` (`pdpo_jax.prefs.folder`) with `build_shard` (`pdpo_jax.prefs.build`: the
method, its determinism and truncation), then writes the summary and DONE. docs/prefs.md has the
whole story.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pdpo_jax.config import RunConfig
from pdpo_jax.data import PromptEncoder
from pdpo_jax.data.corpus import prepare_corpus
from pdpo_jax.storage import append_jsonl
from pdpo_jax.generation import sampler_from_config
from pdpo_jax.model.digest import model_digest
from pdpo_jax.model.hub import looks_like_hub_id
from pdpo_jax.parallel import is_primary, primary_decides
from pdpo_jax.model.classifier import load_classifier
from pdpo_jax.nli import NliReward
from pdpo_jax.prefs import (SPLITS, PrefsError, Side, build_shard, check_settings, missing_shards, plan_split,
                            read_summary, run_settings, scorer_for_layout, settings_of, shard_count, shard_jobs,
                            shard_metrics, shard_path, write_shard, write_summary)
from pdpo_jax.object_store import as_path
from pdpo_jax.prefs.filters import EntailmentFn, applied_settings, entailment_function, filter_settings
from pdpo_jax.prefs.folder import FILTERS_FILE, METRICS_FILE
from pdpo_jax.prefs.summary import apply_filters, filters_line
from pdpo_jax.run_layout import RunLayout
from pdpo_jax.stage_runner import build_mesh, load_for_run, run_command, run_once, write_resolved_config
from pdpo_jax.storage import mark_done


def open_side(name: str, config: RunConfig, cache: dict[str, Side], mesh: Any) -> Side:
    """The model `name` on the run's mesh (one load when generator and reference are the same)."""
    if name in cache:
        return cache[name]
    if name != "default" and not as_path(name).is_dir() and not looks_like_hub_id(name):
        stage = Path(name).parts[-2] if len(Path(name).parts) > 1 and Path(name).name == "best" else None
        hint = (f" (the {stage} stage's output: run `pdpo {stage}` first, or set prefs.generator / prefs.reference)"
                if stage in ("sft", "rl") else "")
        raise PrefsError(f"model directory not found: {name}{hint}")
    model = load_for_run(name, config, mesh=mesh)
    cache[name] = Side(name, model, PromptEncoder(model.tokenizer, config.data.template), model_digest(model), mesh)
    return cache[name]


def make_prefs(config: RunConfig, round_number: int = 1) -> dict[str, Any]:
    """Builds (or resumes) `<run_dir>/prefs`; returns the summary written with the DONE marker.
    `round_number` k > 1 builds round k of iterative DPO instead (`dpo.rounds`): `round-k/prefs`,
    negatives from round k-1's best model with the round's seed (`RunLayout.dpo_round`).

    On a pod every host samples and scores every batch on the shared mesh; process 0 alone
    decides which shards are missing and writes them, so each file is written once."""
    this_round = RunLayout.of(config).dpo_round(config, round_number)
    prefs_dir, paths = this_round.prefs, (this_round.generator, this_round.reference)
    round_config = this_round.prefs_config(config)  # what the records depend on; config.yaml stays the run's
    sides: dict[str, Side] = {}
    accepted: dict[str, Any] = {}  # the settings the folder goes on with

    def check_folder(mesh: Any) -> None:
        # A half-built folder must have been built by these models with these settings; it also
        # decides whether reference log-probs are scored (a scored folder stays scored).
        _check_classifiers(config)
        for name in paths:
            open_side(name, round_config, sides, mesh)
        accepted.update(primary_decides(check_settings, prefs_dir,
                                        settings_of(round_config, *paths, {s.name: s.digest for s in sides.values()})))

    def finished_summary(folder: Path) -> dict[str, Any]:
        # A finished folder is checked without loading the models: its digests stand for them.
        summary = primary_decides(_finished_summary, folder, settings_of(round_config, *paths, digests=None))
        if primary_decides(applied_settings, folder) == filter_settings(config.prefs.filters):
            return summary
        # Other filters than the folder's: judge the stored pairs again, without resampling.
        _check_classifiers(config)
        print(f"make-prefs: filtering the stored pairs of {folder} again with prefs.filters")
        write_resolved_config(config)
        summary = _filter(round_config, folder, summary, build_mesh(config))
        if is_primary():
            mark_done(folder, summary)
        return summary

    def build(_mesh: Any) -> dict[str, Any]:
        return _build(round_config, prefs_dir, *(sides[p] for p in paths), score_reference=accepted["reference_scored"])

    name = "make-prefs" if round_number == 1 else f"make-prefs round {round_number}"
    return run_once(config, name, prefs_dir, build, check=check_folder, when_finished=finished_summary)


def _build(config: RunConfig, prefs_dir: Path, generator: Side, reference: Side, *,
           score_reference: bool) -> dict[str, Any]:
    prefs = config.prefs
    corpus = prepare_corpus(config.data, config.seed)
    plans = {split: plan_split(getattr(corpus, split), prefs.shuffle, prefs.seed) for split in SPLITS}
    sampler = sampler_from_config(prefs.sampler.kind, temperature=prefs.sampler.temperature,
                                  top_k=prefs.sampler.top_k, top_p=prefs.sampler.top_p)
    score = scorer_for_layout(config, reference, score_reference=score_reference)
    counts = {split: shard_count(len(plans[split]), prefs.shard_size) for split in SPLITS}
    missing = [tuple(shard) for shard in primary_decides(missing_shards, prefs_dir, counts)]
    total = sum(len(jobs) for jobs in plans.values())
    done_examples = total - sum(len(shard_jobs(plans[s], k, prefs.shard_size)) for s, k in missing)
    with tqdm(total=total, initial=done_examples, desc="make-prefs", unit="ex", dynamic_ncols=True,
              disable=not is_primary()) as bar:
        for split, k in missing:
            started = time.perf_counter()
            jobs = shard_jobs(plans[split], k, prefs.shard_size)
            records = build_shard(jobs, split, k, config, generator, reference, score, sampler, progress=bar.update)
            if is_primary():
                write_shard(shard_path(prefs_dir, split, k), records)
                append_jsonl(prefs_dir / METRICS_FILE, shard_metrics(split, k, records, time.perf_counter() - started))
    settings = run_settings(config, generator, reference, sampler)
    summary = primary_decides(write_summary, prefs_dir, plans, prefs.shard_size, settings)
    if prefs.filters or primary_decides((prefs_dir / FILTERS_FILE).exists):
        summary = _filter(config, prefs_dir, summary, generator.mesh)
    return summary


def _check_classifiers(config: RunConfig) -> None:
    """The nli filter's classifier must exist before anything is sampled or judged."""
    for section in config.prefs.filters:
        path = Path(section.classifier or RunLayout.of(config).nli_classifier)
        if section.kind == "nli" and not path.is_dir():
            raise PrefsError(f"prefs.filters: the nli filter's classifier {path} is not a directory (run `pdpo "
                             "train-nli` first, or set the filter's classifier)")


def _filter(config: RunConfig, prefs_dir: Path, summary: dict[str, Any], mesh: Any) -> dict[str, Any]:
    """`prefs.filters` over the folder's stored pairs (every host judges; process 0 writes)."""
    provenance: dict[str, Any] = {}

    def open_nli(classifier: str | None) -> EntailmentFn:
        path = Path(classifier or RunLayout.of(config).nli_classifier)
        loaded = load_classifier(path, mesh=mesh, compute_dtype=config.model.dtype)
        provenance["classifier"] = {"path": str(path), "digest": model_digest(loaded)}
        return entailment_function(NliReward(loaded, max_length=config.nli.max_length, mesh=mesh))

    return apply_filters(prefs_dir, summary, config.prefs.filters, nli=open_nli, provenance=provenance,
                         write=is_primary())


def _finished_summary(prefs_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    check_settings(prefs_dir, settings)
    return read_summary(prefs_dir)


# ----------------------------------------------------------------------------- command line


DESCRIPTION = (
    "Build pseudo-preference pairs: for each train/val example, sample a negative from the generator under "
    "another dialogue's persona and store it with the reference model's log-probs (not scored when dpo.loss_type "
    "needs no reference: simpo, orpo, reference-free DPO). Writes "
    "<run_dir>/prefs/{train,val}/shard-*.jsonl, summary.json and DONE; a rerun resumes after the last complete "
    "shard. The generator and reference default to <run_dir>/sft/best (prefs.generator, prefs.reference; "
    "prefs.from_stage=rl starts from the RL baseline's best model instead). prefs.filters (degenerate, margin, copy, "
    "nli) drop stored pairs DPO should not train on, recorded in filters.json; rerunning with other filters on a "
    "finished folder filters its pairs again without resampling."
)


def report(summary: dict[str, Any], config: RunConfig) -> None:
    layout = RunLayout.of(config)
    for split in SPLITS:
        counts = summary["splits"][split]
        print(f"{split}: {counts['kept']} pairs kept of {counts['records']} "
              f"({counts['degenerate_records']} degenerate, {counts['dropped']} dropped, "
              f"{len(counts['skipped_too_long'])} too long); {filters_line(summary, split)} "
              f"-> {layout.prefs_split(split)}")


def main(argv: list[str] | None = None) -> int:
    return run_command("pdpo make-prefs", DESCRIPTION, make_prefs, argv, report)
