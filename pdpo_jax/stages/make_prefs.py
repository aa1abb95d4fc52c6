"""`pdpo make-prefs`: pseudo-preference pairs with swapped personas, resumable shard by shard.

For every example i of the train and val splits (dialogue d, persona p_d, history x_i, response
y_i), the persona of a donor dialogue j = derangement(d) is put in front of the same history and
the generator samples a negative y_neg ~ π_gen(· | p_j, x_i). The pair the DPO stage trains on is
(prompt = p_d + x_i, chosen = y_i, rejected = y_neg), stored with both log-probs under the reference
model for that prompt. `prefs.shuffle: false` samples with the example's own persona (the paper's
"w/o shuffle" ablation).

Layout of `<run_dir>/prefs/`:

    settings.json         what the shards depend on (config subset, model digests); a rerun with
                          different settings refuses to mix its records with these
    train/shard-00000.jsonl, ...   `shard_size` examples each, in corpus order, written atomically
    val/shard-00000.jsonl, ...
    metrics.jsonl         one line per shard written (timing)
    summary.json, DONE    counts (degenerate negatives by reason, dropped, skipped), written last

Determinism: shard k of a split holds the examples [k*shard_size, (k+1)*shard_size) of that
split; they are sampled in batches of `prefs.batch_size`, and batch b of shard k uses the seed
`sample_seed(prefs.seed, split, k, b)` (sha256 of those four values, 31 bits; stored in every
record with the record's row in that batch). Sampling a row depends on its batch's seed and
shape, both fixed by (config, k), so a rerun after a crash skips the complete shards and
rewrites the missing ones exactly as one uninterrupted run would.

Layout (`prefs.layout`): with "per_turn" every example of a batch is prefilled on its own row and
its pair scored in its own [prompt | chosen | rejected] row. With "tree" (the default) a batch's
consecutive generation prompts that extend each other (one dialogue's turns under its donor
persona, with the same history cut) are prefilled once, as the last one's row, and every example
still samples on its own decode row, row `sample_row` of the batch, with the batch's seed
(`pdpo_jax.generation.tree_decode`); then the batch's consecutive pairs that nest (own persona)
are scored one tree row per run (`pdpo_jax.data.trees`). Which prompts share a prefill depends
only on the batch's prompts, so the determinism above holds for either layout. The two layouts
sample from the same distributions with the same random numbers and agree on log-probs within
fp32 rounding, but their bytes differ, so a folder refuses to be resumed in the other layout.

Prompts and truncation: the generation prompt (donor persona + history) keeps the longest history
tail that leaves room for `max_new_tokens` within `data.max_length` (and the model's positions);
the pair's prompt (own persona + that history) then keeps the longest tail for which prompt plus
the longer of chosen and rejected fits. That is the per-turn rule (`prefs.layout: per_turn`);
cut so, a long dialogue's later prompts each drop a little more history and none nest. The tree
layout cuts a batch's consecutive turns of one dialogue as packed SFT rows are cut instead
(`kept_histories`, `nested_history_cuts`): as many consecutive turns as fit keep the same oldest
line, then as much history as the last of them allows; where nothing is cut, both rules keep
the whole history. The history stored in the record is the one used, so
the DPO stage rebuilds exactly the prompt that was scored. A generator with another tokenizer
works: negatives cross between models as text and are re-tokenized for the reference.

The generator and reference digests (`pdpo_jax.model.digest`) cover the architecture and every
weight by name, shape, dtype and bytes: equal for equal models however they were saved, different
for a retrained one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pdpo_jax.config import RunConfig, config_to_dict
from pdpo_jax.data import PromptEncoder, shared_prompt_batch, with_scored_positions
from pdpo_jax.data.corpus import prepare_corpus
from pdpo_jax.data.examples import Example, examples_from_dialogues
from pdpo_jax.data.overlap import normalize_utterance
from pdpo_jax.data.preferences import (
    DEGENERATE_REASONS,
    SPLITS,
    SUMMARY_FILE,
    PrefsError,
    read_shard,
    shard_path,
)
from pdpo_jax.data.pairs import PairIds
from pdpo_jax.data.shuffle import persona_derangement
from pdpo_jax.data.trees import dialogue_runs, nested_history_cuts, pair_trees, tree_batch
from pdpo_jax.storage import append_jsonl, atomic_write_json, atomic_write_jsonl, is_done, mark_done
from pdpo_jax.generation import context_limit, respond, sampler_description, sampler_from_config
from pdpo_jax.generation.tree_decode import next_power_of_two
from pdpo_jax.model import Model
from pdpo_jax.model.digest import model_digest
from pdpo_jax.model.hub import looks_like_hub_id
from pdpo_jax.scoring import make_scorer
from pdpo_jax.parallel import is_primary, primary_decides, rows_for_mesh
from pdpo_jax.stages.common import (
    build_mesh,
    claim_run_dir,
    config_from_args,
    finished,
    load_for_run,
    stage_parser,
    write_resolved_config,
)

SETTINGS_FILE = "settings.json"
PAIR_ARRAYS = ("ref_chosen_logps", "ref_rejected_logps", "pair_mask")  # the DPO step's, not the scorer's


# ----------------------------------------------------------------------------- pure pieces


def sample_seed(base_seed: int, split: str, shard: int, batch: int) -> int:
    digest = hashlib.sha256(f"pdpo-prefs\x00{base_seed}\x00{split}\x00{shard}\x00{batch}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def degenerate_reasons(rejected: str, chosen: str, stopped: bool) -> list[str]:
    """Why a sampled negative teaches nothing: empty, the chosen response again, or cut off."""
    reasons = []
    if not rejected.strip():
        reasons.append("empty")
    elif normalize_utterance(rejected) == normalize_utterance(chosen):
        reasons.append("same_as_chosen")
    if not stopped:
        reasons.append("truncated")
    return reasons


def shard_count(examples: int, shard_size: int) -> int:
    return math.ceil(examples / shard_size)


# ----------------------------------------------------------------------------- building


@dataclass(frozen=True)
class PairJob:
    example: Example
    donor_id: str
    donor_persona: tuple[str, ...]


@dataclass
class Side:
    """A model opened for one role (generator or reference) with what a record says about it."""

    name: str  # as configured
    model: Model
    encoder: PromptEncoder
    digest: str
    mesh: Any  # the run's mesh the weights were placed on as they were read


def plan_split(dialogues: Sequence[Any], shuffle: bool, seed: int) -> list[PairJob]:
    """Every example of `dialogues` with the persona it is sampled under, in corpus order."""
    donors = persona_derangement(dialogues, seed=seed, shuffle=shuffle)
    persona_of = {d.id: tuple(d.persona) for d in dialogues}
    return [PairJob(ex, donors[ex.dialogue_id], persona_of[donors[ex.dialogue_id]]) for ex in examples_from_dialogues(dialogues)]


def resolve_model_paths(config: RunConfig) -> tuple[str, str]:
    """(generator, reference): as configured, else the best model of `prefs.from_stage` (SFT, or
    the RL baseline for "+RL(DialogueNLI) +PseudoDPO")."""
    start = os.fspath(Path(config.run_dir) / config.prefs.from_stage / "best")
    return config.prefs.generator or start, config.prefs.reference or start


def open_side(name: str, config: RunConfig, cache: dict[str, Side], mesh: Any) -> Side:
    """The model `name` on the run's mesh (one load when generator and reference are the same)."""
    if name in cache:
        return cache[name]
    if name != "default" and not Path(name).is_dir() and not looks_like_hub_id(name):
        stage = Path(name).parts[-2] if len(Path(name).parts) > 1 and Path(name).name == "best" else None
        hint = (f" (the {stage} stage's output: run `pdpo {stage}` first, or set prefs.generator / prefs.reference)"
                if stage in ("sft", "rl") else "")
        raise PrefsError(f"model directory not found: {name}{hint}")
    model = load_for_run(name, config, mesh=mesh)
    cache[name] = Side(name, model, PromptEncoder(model.tokenizer, config.data.template), model_digest(model), mesh)
    return cache[name]


def settings_of(config: RunConfig, digests: dict[str, str] | None) -> dict[str, Any]:
    """Everything the records depend on; equal settings give byte-identical shards. Without
    `digests`, the models are left out of the comparison with earlier settings (see check_settings)."""
    full = config_to_dict(config)
    generator, reference = resolve_model_paths(config)
    return {
        "seed": config.seed,
        "data": full["data"],
        "prefs": full["prefs"],
        "model_dtype": config.model.dtype,
        "generator": {"path": generator, "digest": None if digests is None else digests[generator]},
        "reference": {"path": reference, "digest": None if digests is None else digests[reference]},
    }


def check_settings(prefs_dir: Path, settings: dict[str, Any]) -> None:
    """Writes settings.json; once shards exist, later runs must match it, or old shards would mix in."""
    path = prefs_dir / SETTINGS_FILE
    has_shards = any(prefs_dir.glob("*/shard-*.jsonl")) or is_done(prefs_dir)
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    if old is not None and "prefs" in old:
        old["prefs"].setdefault("layout", "per_turn")  # a folder begun before there was a choice
    if old is not None and settings["generator"]["digest"] is None:
        for side in ("generator", "reference"):
            settings[side]["digest"] = old.get(side, {}).get("digest")
    if old is None or not has_shards:
        atomic_write_json(path, settings)
        return
    if old != settings:
        changed = _first_difference(old, settings)
        raise PrefsError(
            f"{path}: this folder holds records made with other settings ({changed}); delete {prefs_dir} "
            "to rebuild, or run with the original settings to resume"
        )


def _first_difference(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: was {old!r}, now {new!r}"


class ScoreFn:
    """The reference's summed log-probs of [prompt | chosen | rejected] rows (`prefs.layout:
    per_turn`), by the shared scorer (the one DNLI ranking uses), in batches of a fixed number of
    rows (rounded up to split over the mesh; every process passes the whole batch and reads every
    score)."""

    def __init__(self, side: Side, rows: int, length_bucket: int):
        self.rows, self.length_bucket = rows_for_mesh(rows, side.mesh), length_bucket
        self._scorer = make_scorer(side.model, num_sequences=2 * self.rows, mesh=side.mesh)

    def __call__(self, prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]]):
        fill = self.rows - len(prompts)
        batch = with_scored_positions(shared_prompt_batch(
            prompts + [prompts[-1]] * fill,
            [[c, r] for c, r in zip(chosen + [chosen[-1]] * fill, rejected + [rejected[-1]] * fill)],
            bucket=self.length_bucket,
        ))
        logps, counts = self._scorer({k: np.asarray(v) for k, v in batch.items()})
        logps = logps.astype(np.float64)
        n = len(prompts)
        return logps[0 : 2 * n : 2], logps[1 : 2 * n : 2], counts[0 : 2 * n : 2], counts[1 : 2 * n : 2]


class TreeScoreFn:
    """The same log-probs (`prefs.layout: tree`) with one row per run of nesting pairs
    (`pdpo_jax.data.trees`): a dialogue's consecutive pairs share one trunk, the last pair's
    [prompt | chosen], on which every chosen response is scored, and each rejected response is a
    branch forking off the trunk where its chosen begins. Rows and pair slots per row are rounded
    up to powers of two (at most the batch size; rows then to split over the mesh), so a run
    compiles a handful of shapes."""

    def __init__(self, side: Side, rows: int, length_bucket: int):
        self.side, self.rows, self.length_bucket = side, rows, length_bucket

    def __call__(self, prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]]):
        pairs = [PairIds(tuple(p), tuple(c), tuple(r)) for p, c, r in zip(prompts, chosen, rejected)]
        trees = pair_trees(pairs)
        rows = rows_for_mesh(next_power_of_two(len(trees), self.rows), self.side.mesh)
        pairs_per_row = next_power_of_two(max(tree.num_pairs for tree in trees), self.rows)
        batch = tree_batch(trees + [None] * (rows - len(trees)), pairs_per_row, bucket=self.length_bucket)
        batch = with_scored_positions({k: v for k, v in batch.items() if k not in PAIR_ARRAYS})
        scorer = make_scorer(self.side.model, num_sequences=2 * rows * pairs_per_row, mesh=self.side.mesh)
        logps, counts = scorer(batch)
        slots = [row * pairs_per_row + k for row, tree in enumerate(trees) for k in range(tree.num_pairs)]
        chosen_at, rejected_at = [2 * slot for slot in slots], [2 * slot + 1 for slot in slots]
        logps = logps.astype(np.float64)
        return logps[chosen_at], logps[rejected_at], counts[chosen_at], counts[rejected_at]


def scorer_for_layout(config: RunConfig, reference: Side) -> ScoreFn | TreeScoreFn:
    score_class = TreeScoreFn if config.prefs.layout == "tree" else ScoreFn
    return score_class(reference, config.prefs.batch_size, config.data.length_bucket)


def build_shard(jobs: Sequence[PairJob], split: str, shard: int, config: RunConfig, generator: Side,
                reference: Side, score: ScoreFn | TreeScoreFn, sampler: Any,
                progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """The records of one shard: a pure function of (config, split, shard). `progress(n)` is
    called after each sampling batch with its number of examples."""
    batch_size = config.prefs.batch_size
    records = []
    for b, start in enumerate(range(0, len(jobs), batch_size)):
        batch_jobs = jobs[start : start + batch_size]
        seed = sample_seed(config.prefs.seed, split, shard, b)
        records += batch_records(batch_jobs, split, seed, config, generator, reference, score, sampler)
        if progress is not None:
            progress(len(batch_jobs))
    return records


def batch_records(batch_jobs: Sequence[PairJob], split: str, seed: int, config: RunConfig, generator: Side,
                  reference: Side, score: ScoreFn | TreeScoreFn, sampler: Any) -> list[dict[str, Any]]:
    """The records of one sampling batch: negatives drawn with `seed`, both sides scored."""
    prefs = config.prefs
    nested = prefs.layout == "tree"
    fitted = []  # (job, generation history, generation prompt ids)
    room = context_limit(generator.model, config.data.max_length) - prefs.max_new_tokens
    kept = kept_histories(batch_jobs, [job.donor_persona for job in batch_jobs], [0] * len(batch_jobs), room,
                          generator.encoder, nested=nested)
    for job, history in zip(batch_jobs, kept):
        if history is None:
            _too_long(config, job, f"the donor persona leaves no room for {prefs.max_new_tokens} new tokens")
            continue
        fitted.append((job, history, generator.encoder.prompt_ids(job.donor_persona, history)))
    if not fitted:
        return []
    responses = respond(generator.model, generator.encoder, [p for _, _, p in fitted],
                        max_new_tokens=prefs.max_new_tokens, sampler=sampler, seed=seed, rows=prefs.batch_size,
                        mesh=generator.mesh, share_prefixes=nested)
    limit = context_limit(reference.model, config.data.max_length)
    responses_ids = [(reference.encoder.response_ids(job.example.response), reference.encoder.response_ids(r.text))
                     for (job, _, _), r in zip(fitted, responses)]
    pair_kept = kept_histories([job for job, _, _ in fitted], [job.example.persona for job, _, _ in fitted],
                               [max(map(len, ids)) for ids in responses_ids], limit, reference.encoder,
                               nested=nested, within=[history for _, history, _ in fitted])
    pairs = []  # (row, job, pair history, prompt ids, chosen ids, rejected ids, response)
    for row, ((job, _, _), response, (chosen_ids, rejected_ids), pair_history) in enumerate(
            zip(fitted, responses, responses_ids, pair_kept)):
        if pair_history is None:
            _too_long(config, job, "the persona and the longer response alone exceed data.max_length")
            continue
        prompt = reference.encoder.prompt_ids(job.example.persona, pair_history)
        pairs.append((row, job, pair_history, prompt, chosen_ids, rejected_ids, response))
    if not pairs:
        return []
    records = []
    chosen_logps, rejected_logps, chosen_counts, rejected_counts = score(
        [p[3] for p in pairs], [p[4] for p in pairs], [p[5] for p in pairs]
    )
    for i, (row, job, pair_history, _, _, _, response) in enumerate(pairs):
        reasons = degenerate_reasons(response.text, job.example.response, response.stopped)
        records.append({
            "example_id": job.example.id,
            "dialogue_id": job.example.dialogue_id,
            "donor_dialogue_id": job.donor_id,
            "split": split,
            "persona": list(job.example.persona),
            "donor_persona": list(job.donor_persona),
            "history": list(pair_history),
            "history_turns_dropped": len(job.example.history) - len(pair_history),
            "chosen": job.example.response,
            "rejected": response.text,
            "shuffled": prefs.shuffle,
            "generator": generator.name,
            "generator_digest": generator.digest,
            "reference": reference.name,
            "reference_digest": reference.digest,
            "sampler": sampler_description(sampler),
            "max_new_tokens": prefs.max_new_tokens,
            "sample_seed": seed,
            "sample_row": row,
            "ref_chosen_logp": float(chosen_logps[i]),
            "ref_rejected_logp": float(rejected_logps[i]),
            "chosen_tokens": int(chosen_counts[i]),
            "rejected_tokens": int(rejected_counts[i]),
            "degenerate": reasons,
            "dropped": bool(reasons) and prefs.drop_degenerate,
        })
    return records


def kept_histories(jobs: Sequence[PairJob], personas: Sequence[Sequence[str]], reserved: Sequence[int], limit: int,
                   encoder: PromptEncoder, *, nested: bool,
                   within: Sequence[Sequence[str]] | None = None) -> list[tuple[str, ...] | None]:
    """The history tail each job's prompt keeps so that the prompt (under `personas[i]`) plus
    `reserved[i]` tokens fit `limit`, never more than `within[i]` (the generation prompt's, for a
    pair); None where even the persona alone does not fit. Per turn, each keeps its longest tail;
    `nested`, a dialogue's consecutive jobs are cut as packed SFT rows are
    (`nested_history_cuts`), so that their prompts nest and share a prefill and a tree row."""
    histories = [tuple(job.example.history) for job in jobs]
    floor = [0] * len(jobs) if within is None else [len(h) - len(w) for h, w in zip(histories, within)]

    def fits(i: int, dropped: int) -> bool:
        return dropped >= floor[i] and len(encoder.prompt_ids(personas[i], histories[i][dropped:])) + reserved[i] <= limit

    if not nested:
        kept = []
        for i, history in enumerate(histories):
            tail = encoder.fit_history(personas[i], history[floor[i]:], limit - reserved[i])
            kept.append(tail)
        return kept
    cuts: list[int | None] = []
    for run in dialogue_runs([job.example for job in jobs]):
        cuts += nested_history_cuts([len(histories[i]) for i in run], lambda turn, dropped: fits(run[turn], dropped))
    return [None if dropped is None else history[dropped:] for history, dropped in zip(histories, cuts)]


def _too_long(config: RunConfig, job: PairJob, why: str) -> None:
    if config.data.on_overflow == "error":
        raise PrefsError(
            f"example {job.example.id!r}: {why} (data.max_length={config.data.max_length}); "
            "set data.on_overflow=skip to leave such examples out"
        )


def split_summary(prefs_dir: Path, split: str, jobs: Sequence[PairJob], shard_size: int) -> dict[str, Any]:
    """Counts recomputed from the shard files, so a resumed run reports what one run would."""
    shards = shard_count(len(jobs), shard_size)
    records = [r for k in range(shards) for r in read_shard(shard_path(prefs_dir, split, k))]
    planned = [job.example.id for job in jobs]
    written = {r["example_id"] for r in records}
    unexpected = written - set(planned)
    if unexpected:
        raise PrefsError(f"{prefs_dir / split}: records for examples not in this split: {sorted(unexpected)[:5]}")
    return {
        "examples": len(jobs),
        "records": len(records),
        "shards": shards,
        "skipped_too_long": [i for i in planned if i not in written],
        "degenerate": {reason: sum(reason in r["degenerate"] for r in records) for reason in DEGENERATE_REASONS},
        "degenerate_records": sum(bool(r["degenerate"]) for r in records),
        "dropped": sum(r["dropped"] for r in records),
        "kept": sum(not r["dropped"] for r in records),
    }


def make_prefs(config: RunConfig) -> dict[str, Any]:
    """Builds (or resumes) `<run_dir>/prefs`; returns the summary written with the DONE marker.

    On a pod every host samples and scores every batch on the shared mesh; process 0 alone
    decides which shards are missing and writes them, so each file is written once."""
    prefs, prefs_dir = config.prefs, Path(config.run_dir) / "prefs"
    mesh = build_mesh(config)
    if finished(prefs_dir):
        # A finished folder is checked without loading the models: its digests stand for them.
        return primary_decides(_finished_summary, prefs_dir, settings_of(config, digests=None))
    cache: dict[str, Side] = {}
    generator, reference = (open_side(name, config, cache, mesh) for name in resolve_model_paths(config))
    primary_decides(check_settings, prefs_dir,
                    settings_of(config, {side.name: side.digest for side in (generator, reference)}))
    write_resolved_config(config)
    corpus = prepare_corpus(config.data, config.seed)
    plans = {split: plan_split(getattr(corpus, split), prefs.shuffle, prefs.seed) for split in SPLITS}
    sampler = sampler_from_config(prefs.sampler.kind, temperature=prefs.sampler.temperature,
                                  top_k=prefs.sampler.top_k, top_p=prefs.sampler.top_p)
    score = scorer_for_layout(config, reference)
    shards = [(split, k) for split in SPLITS for k in range(shard_count(len(plans[split]), prefs.shard_size))]
    missing = [tuple(shard) for shard in primary_decides(
        lambda: [(s, k) for s, k in shards if not shard_path(prefs_dir, s, k).exists()])]
    total = sum(len(jobs) for jobs in plans.values())
    done_examples = total - sum(len(_shard_jobs(plans[s], k, prefs.shard_size)) for s, k in missing)
    with tqdm(total=total, initial=done_examples, desc="make-prefs", unit="ex", dynamic_ncols=True,
              disable=not is_primary()) as bar:
        for split, k in missing:
            started = time.perf_counter()
            jobs = _shard_jobs(plans[split], k, prefs.shard_size)
            records = build_shard(jobs, split, k, config, generator, reference, score, sampler, progress=bar.update)
            if is_primary():
                atomic_write_jsonl(shard_path(prefs_dir, split, k), records)
                append_jsonl(prefs_dir / "metrics.jsonl", {
                    "split": split, "shard": k, "records": len(records),
                    "degenerate": sum(bool(r["degenerate"]) for r in records),
                    "seconds": round(time.perf_counter() - started, 3),
                })
    summary = {
        "shuffled": prefs.shuffle,
        "drop_degenerate": prefs.drop_degenerate,
        "generator": {"path": generator.name, "digest": generator.digest},
        "reference": {"path": reference.name, "digest": reference.digest},
        "sampler": sampler_description(sampler),
        "max_new_tokens": prefs.max_new_tokens,
        "seed": prefs.seed,
        "seed_derivation": "sha256('pdpo-prefs\\0{prefs.seed}\\0{split}\\0{shard}\\0{batch}')[:4] >> 1",
    }
    return primary_decides(_write_summary, prefs_dir, plans, prefs.shard_size, summary)


def _finished_summary(prefs_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    check_settings(prefs_dir, settings)
    return json.loads((prefs_dir / SUMMARY_FILE).read_text(encoding="utf-8"))


def _write_summary(prefs_dir: Path, plans: dict[str, list[PairJob]], shard_size: int,
                   summary: dict[str, Any]) -> dict[str, Any]:
    """Counts recomputed from the shard files, written with the DONE marker last."""
    summary = {"splits": {split: split_summary(prefs_dir, split, plans[split], shard_size) for split in SPLITS},
               **summary}
    atomic_write_json(prefs_dir / SUMMARY_FILE, summary)
    mark_done(prefs_dir, summary)
    return summary


def _shard_jobs(jobs: Sequence[PairJob], k: int, shard_size: int) -> Sequence[PairJob]:
    return jobs[k * shard_size : (k + 1) * shard_size]


# ----------------------------------------------------------------------------- command line


DESCRIPTION = (
    "Build pseudo-preference pairs: for each train/val example, sample a negative from the generator under "
    "another dialogue's persona and store it with the reference model's log-probs. Writes "
    "<run_dir>/prefs/{train,val}/shard-*.jsonl, summary.json and DONE; a rerun resumes after the last complete "
    "shard. The generator and reference default to <run_dir>/sft/best (prefs.generator, prefs.reference; "
    "prefs.from_stage=rl starts from the RL baseline's best model instead)."
)


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(stage_parser("pdpo make-prefs", DESCRIPTION).parse_args(argv))
    with claim_run_dir(config):
        summary = make_prefs(config)
    prefs_dir = Path(config.run_dir) / "prefs"
    for split in SPLITS:
        counts = summary["splits"][split]
        print(f"{split}: {counts['kept']} pairs kept of {counts['records']} "
              f"({counts['degenerate_records']} degenerate, {counts['dropped']} dropped, "
              f"{len(counts['skipped_too_long'])} too long) -> {prefs_dir / split}")
    return 0
