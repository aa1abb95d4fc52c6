"""Building pseudo-preference records: donor personas, kept histories, sampled negatives.

For every example i of the train and val splits (dialogue d, persona p_d, history x_i, response
y_i), the persona of a donor dialogue j = derangement(d) is put in front of the same history and
the generator samples a negative y_neg ~ π_gen(· | p_j, x_i). The pair the DPO stage trains on is
(prompt = p_d + x_i, chosen = y_i, rejected = y_neg), stored with both log-probs under the reference
model for that prompt. `prefs.shuffle: false` samples with the example's own persona (the paper's
"w/o shuffle" ablation).

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
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pdpo_jax.config import RunConfig
from pdpo_jax.data import PromptEncoder
from pdpo_jax.data.examples import Example, examples_from_dialogues
from pdpo_jax.data.overlap import normalize_utterance
from pdpo_jax.data.shuffle import persona_derangement
from pdpo_jax.data.trees import dialogue_runs, nested_history_cuts
from pdpo_jax.generation import context_limit, respond, sampler_description
from pdpo_jax.prefs.record import PreferenceRecord, PrefsError
from pdpo_jax.prefs.score import CountOnlyFn, ScoreFn, TreeScoreFn
from pdpo_jax.prefs.side import Side


def sample_seed(base_seed: int, split: str, shard: int, batch: int) -> int:
    """The seed of sampling batch `batch` of shard `shard`: 31 bits of a sha256 of all four."""
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
    """How many shards a split of `examples` examples fills (the last may be short)."""
    return math.ceil(examples / shard_size)


@dataclass(frozen=True)
class PairJob:
    """An example and the donor persona its negative is sampled under."""

    example: Example
    donor_id: str
    donor_persona: tuple[str, ...]


def plan_split(dialogues: Sequence[Any], shuffle: bool, seed: int) -> list[PairJob]:
    """Every example of `dialogues` with the persona it is sampled under, in corpus order."""
    donors = persona_derangement(dialogues, seed=seed, shuffle=shuffle)
    persona_of = {d.id: tuple(d.persona) for d in dialogues}
    return [PairJob(ex, donors[ex.dialogue_id], persona_of[donors[ex.dialogue_id]]) for ex in examples_from_dialogues(dialogues)]


def build_shard(jobs: Sequence[PairJob], split: str, shard: int, config: RunConfig, generator: Side,
                reference: Side, score: ScoreFn | TreeScoreFn | CountOnlyFn, sampler: Any,
                progress: Callable[[int], None] | None = None) -> list[PreferenceRecord]:
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
                  reference: Side, score: ScoreFn | TreeScoreFn | CountOnlyFn, sampler: Any) -> list[PreferenceRecord]:
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
        records.append(PreferenceRecord(
            example_id=job.example.id,
            dialogue_id=job.example.dialogue_id,
            donor_dialogue_id=job.donor_id,
            split=split,
            persona=tuple(job.example.persona),
            donor_persona=tuple(job.donor_persona),
            history=tuple(pair_history),
            history_turns_dropped=len(job.example.history) - len(pair_history),
            chosen=job.example.response,
            rejected=response.text,
            shuffled=prefs.shuffle,
            generator=generator.name,
            generator_digest=generator.digest,
            reference=reference.name,
            reference_digest=reference.digest,
            sampler=sampler_description(sampler),
            max_new_tokens=prefs.max_new_tokens,
            sample_seed=seed,
            sample_row=row,
            ref_chosen_logp=None if chosen_logps[i] is None else float(chosen_logps[i]),
            ref_rejected_logp=None if rejected_logps[i] is None else float(rejected_logps[i]),
            chosen_tokens=int(chosen_counts[i]),
            rejected_tokens=int(rejected_counts[i]),
            degenerate=tuple(reasons),
            dropped=bool(reasons) and prefs.drop_degenerate,
        ))
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


def shard_jobs(jobs: Sequence[PairJob], k: int, shard_size: int) -> Sequence[PairJob]:
    """The jobs of shard `k`: examples [k * shard_size, (k + 1) * shard_size) of the split."""
    return jobs[k * shard_size : (k + 1) * shard_size]
