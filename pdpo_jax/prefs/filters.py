"""Filters over stored pseudo-preference pairs: which pairs DPO should not train on, and why.

    verdict = filter_folder(prefs_dir, config.prefs.filters, nli=open_nli)   # writes filters.json
    kept = read_records(prefs_dir, "train")                                    # leaves the dropped out

The filters judge the records `make-prefs` stored and never resample; each gives, per record, the
reason it objects to the pair or None:

    degenerate  the negative is empty, the chosen response again, or cut off (the record's
                `degenerate` reasons; `prefs.drop_degenerate` drops the same pairs while sampling)
    margin      the reference already prefers chosen over rejected by more than `nats` nats
                (summed log-probs: ref_chosen_logp - ref_rejected_logp > nats): little to learn
    copy        the negative repeats a donor persona sentence nearly verbatim: it holds at least
                `share` of that sentence's word pairs (`pdpo_jax.data.persona_copy`); such a
                negative teaches "do not say this fact", not "stay consistent with your own"
    nli         the NLI classifier judges the negative entailed by a sentence of the pair's own
                (true) persona: P(entailment) >= `entailment` for some sentence, premise = the
                persona sentence, hypothesis = the negative. Such a negative is consistent with
                the persona it should contradict, so the pair is mislabelled

Every filter judges every record that the folder itself keeps (not `dropped` while sampling); a
pair is dropped when any filter objects. `filters.json` beside the shards holds, per split, the
counts before and after, per filter how many pairs it objects to (`flagged`, alone) and how many it
drops (`dropped`: the first filter, in config order, to object), and for each dropped pair every
objection with its reason. The folder's summary.json carries the same counts, without the per-pair
list. Applying other filters rewrites these two files; the shards stay as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pdpo_jax.config import PairFilterSection
from pdpo_jax.data.persona_copy import copied_sentence
from pdpo_jax.nli import NliReward
from pdpo_jax.object_store import as_path
from pdpo_jax.storage import atomic_write_json
from pdpo_jax.prefs.record import SPLITS, PreferenceRecord, PrefsError

FILTERS_FILE = "filters.json"

# `nli(classifier_path)`: for each (persona, text), `[sentences]` entailment probabilities of
# each persona sentence as premise and the text as hypothesis.
EntailmentFn = Callable[[Sequence[Sequence[str]], Sequence[str]], list[Sequence[float]]]


class PairFilter(Protocol):
    kind: str

    def objections(self, records: Sequence[PreferenceRecord]) -> list[str | None]:
        """Per record, why the pair should not be trained on, or None."""


@dataclass(frozen=True)
class DegenerateFilter:
    kind = "degenerate"

    def objections(self, records: Sequence[PreferenceRecord]) -> list[str | None]:
        return [f"degenerate negative ({', '.join(r.degenerate)})" if r.degenerate else None for r in records]


@dataclass(frozen=True)
class MarginFilter:
    nats: float
    kind = "margin"

    def objections(self, records: Sequence[PreferenceRecord]) -> list[str | None]:
        reasons = []
        for r in records:
            if r.ref_chosen_logp is None:
                raise PrefsError(f"example {r.example_id!r}: the margin filter needs reference log-probs, and this "
                                 "folder has none (made for an objective without a reference: docs/objectives.md)")
            margin = r.ref_chosen_logp - r.ref_rejected_logp
            reasons.append(f"reference margin {margin:.2f} nats > {self.nats:g}" if margin > self.nats else None)
        return reasons


@dataclass(frozen=True)
class CopyFilter:
    share: float
    kind = "copy"

    def objections(self, records: Sequence[PreferenceRecord]) -> list[str | None]:
        reasons = []
        for r in records:
            copied = copied_sentence(r.donor_persona, r.rejected, self.share)
            reasons.append(None if copied is None else
                           f"repeats {copied[1]:.0%} of the word pairs of donor persona sentence "
                           f"{copied[0]} {r.donor_persona[copied[0]]!r}")
        return reasons


@dataclass(frozen=True)
class NliFilter:
    entailment_of: EntailmentFn
    entailment: float
    kind = "nli"

    def objections(self, records: Sequence[PreferenceRecord]) -> list[str | None]:
        probabilities = self.entailment_of([r.persona for r in records], [r.rejected for r in records])
        reasons = []
        for r, per_sentence in zip(records, probabilities):
            best = max(range(len(per_sentence)), key=lambda i: per_sentence[i], default=None)
            entailed = best is not None and per_sentence[best] >= self.entailment
            reasons.append(f"entailed by persona sentence {best} {r.persona[best]!r} "
                           f"(P(entailment) {per_sentence[best]:.3f} >= {self.entailment:g})" if entailed else None)
        return reasons


def entailment_function(reward: NliReward) -> EntailmentFn:
    """The entailment probabilities of an NLI reward's classifier, per persona sentence of each text."""
    column = list(reward.classifier.labels).index("entailment")
    return lambda personas, texts: [p[:, column].tolist() for p in reward.sentence_probabilities(personas, texts)]


def pair_filter(section: PairFilterSection, nli: Callable[[str | None], EntailmentFn] | None = None) -> PairFilter:
    """The filter a `prefs.filters` entry describes; `nli(classifier)` opens the NLI classifier
    (only called for an `nli` entry)."""
    if section.kind == "degenerate":
        return DegenerateFilter()
    if section.kind == "margin":
        return MarginFilter(section.nats)
    if section.kind == "copy":
        return CopyFilter(section.share)
    if section.kind == "nli":
        if nli is None:
            raise PrefsError("the nli pair filter needs an NLI classifier, and none was given")
        return NliFilter(nli(section.classifier), section.entailment)
    raise PrefsError(f"unknown pair filter {section.kind!r}")


def filter_settings(sections: Sequence[PairFilterSection]) -> list[dict[str, Any]]:
    """The settings a folder's filters.json records, to compare with a config's."""
    return [section.settings() for section in sections]


def judge_split(records: Sequence[PreferenceRecord], filters: Sequence[PairFilter]) -> dict[str, Any]:
    """One split's verdict: counts before and after, per filter, and every dropped pair's reasons.
    `records` are the split's records the folder keeps (not `dropped` while sampling)."""
    objections = {f.kind: f.objections(records) if records else [] for f in filters}
    dropped: dict[str, list[dict[str, str]]] = {}
    per_filter = {f.kind: {"flagged": 0, "dropped": 0} for f in filters}
    for i, record in enumerate(records):
        reasons = [{"filter": kind, "why": why[i]} for kind, why in objections.items() if why[i] is not None]
        for reason in reasons:
            per_filter[reason["filter"]]["flagged"] += 1
        if reasons:
            per_filter[reasons[0]["filter"]]["dropped"] += 1
            dropped[record.example_id] = reasons
    return {"before": len(records), "after": len(records) - len(dropped), "filters": per_filter, "dropped": dropped}


def filter_records(records_by_split: dict[str, Sequence[PreferenceRecord]], filters: Sequence[PairFilter],
                   settings: list[dict[str, Any]], provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole verdict (what filters.json holds) over every split's kept records."""
    return {"filters": settings, **(provenance or {}),
            "splits": {split: judge_split(records_by_split[split], filters) for split in records_by_split}}


def write_verdict(prefs_dir: str | Path, verdict: dict[str, Any]) -> Path:
    return atomic_write_json(as_path(prefs_dir) / FILTERS_FILE, verdict)


def read_verdict(prefs_dir: str | Path) -> dict[str, Any] | None:
    """A folder's filters.json, or None when no filter was ever applied."""
    path = as_path(prefs_dir) / FILTERS_FILE
    if not path.exists():
        return None
    try:
        verdict = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(verdict.get("filters"), list) or not isinstance(verdict.get("splits"), dict):
            raise ValueError("no 'filters' list or 'splits' mapping")
        for split, entry in verdict["splits"].items():
            if split not in SPLITS or not isinstance(entry.get("dropped"), dict):
                raise ValueError(f"split {split!r} has no 'dropped' mapping")
    except (json.JSONDecodeError, ValueError, AttributeError) as err:
        raise PrefsError(f"{path}: not a pair-filter verdict ({err}); delete it and run `pdpo make-prefs` "
                         "to filter again") from None
    return verdict


def applied_settings(prefs_dir: str | Path) -> list[dict[str, Any]]:
    """The settings of the filters applied to a folder ([] when none ever was)."""
    verdict = read_verdict(prefs_dir)
    return [] if verdict is None else verdict["filters"]


def check_filters(prefs_dir: str | Path, sections: Sequence[PairFilterSection]) -> None:
    """Refuses a folder whose applied filters are not the ones `sections` asks for, naming both."""
    wanted, applied = filter_settings(sections), applied_settings(prefs_dir)
    if wanted != applied:
        raise PrefsError(f"{as_path(prefs_dir) / FILTERS_FILE}: the pairs were filtered with {applied}, the config asks "
                         f"for prefs.filters {wanted}; run `pdpo make-prefs` with this config to filter them again "
                         "(no resampling)")


def filter_counts(verdict: dict[str, Any]) -> dict[str, Any]:
    """The verdict without its per-pair list: what summary.json and `pdpo data inspect` show."""
    return {"filters": verdict["filters"], "file": FILTERS_FILE,
            "splits": {split: {k: v for k, v in entry.items() if k != "dropped"}
                       for split, entry in verdict["splits"].items()}}


def filtered_out(prefs_dir: str | Path, split: str) -> set[str]:
    """The example ids of a split that the folder's filters dropped."""
    verdict = read_verdict(prefs_dir)
    if verdict is None or split not in verdict["splits"]:
        return set()
    return set(verdict["splits"][split]["dropped"])
