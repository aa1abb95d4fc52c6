"""Pair filters over stored preference records: each filter's rule on records made by hand, the
verdict's counts, `prefs.filters` in configs, the reader leaving filtered pairs out, DPO refusing a
folder filtered otherwise, `pdpo data inspect` on a filtered folder, and the nli filter with a real
(tiny, trained) NLI classifier dropping a negative that restates the true persona."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from nli_fixtures import NLI_MAX_LENGTH, train_tiny_classifier
from prefs_fixtures import STORED_RECORD_LINE

from pdpo_jax.config import ConfigError, PairFilterSection, load_config
from pdpo_jax.model.classifier import load_classifier
from pdpo_jax.nli import NliReward
from pdpo_jax.prefs import PreferenceRecord, PrefsError, read_records, shard_path, write_shard
from pdpo_jax.prefs.filters import (FILTERS_FILE, CopyFilter, DegenerateFilter, MarginFilter, check_filters,
                                    entailment_function, judge_split)
from pdpo_jax.prefs.summary import apply_filters, folder_overview
from pdpo_jax.stages import data as data_stage
from pdpo_jax.storage import atomic_write_json, mark_done

BASE = PreferenceRecord.from_json_line(STORED_RECORD_LINE, "fixture")
PERSONA = ("i love cats .", "i live in paris .")
DONOR = ("i am a chef .", "my car is red .")
RESTATES_PERSONA = "i love cats ."
CONTRADICTS_PERSONA = "i do not live in paris ."


def record(example_id: str, rejected: str = "i cook french food .", chosen_logp: float = -20.0,
           rejected_logp: float = -30.0, degenerate: tuple[str, ...] = (), split: str = "train") -> PreferenceRecord:
    return dataclasses.replace(BASE, example_id=example_id, split=split, persona=PERSONA, donor_persona=DONOR,
                               rejected=rejected, ref_chosen_logp=chosen_logp, ref_rejected_logp=rejected_logp,
                               degenerate=degenerate, dropped=False)


def test_margin_filter_drops_pairs_the_reference_separates_by_more_than_m_nats():
    records = [record("a", chosen_logp=-10.0, rejected_logp=-15.0),  # margin 5: not more than 5
               record("b", chosen_logp=-10.0, rejected_logp=-15.5),  # 5.5 > 5
               record("c", chosen_logp=-20.0, rejected_logp=-12.0)]  # the reference prefers rejected
    reasons = MarginFilter(5.0).objections(records)
    assert reasons[0] is None and reasons[2] is None
    assert reasons[1] == "reference margin 5.50 nats > 5"


def test_copy_filter_drops_a_negative_repeating_a_donor_sentence_nearly_verbatim():
    donor = ("i work as a chef in paris .",)  # word pairs: i-work work-as as-a a-chef chef-in in-paris (6)
    records = [dataclasses.replace(record(i), donor_persona=donor, rejected=text) for i, text in enumerate([
        "I work as a chef in Paris!",  # verbatim, case and punctuation aside: 6/6
        "well i work as a chef in rome",  # one word changed at the end: 5/6 = 83% >= 80%
        "i work as a cook in paris",  # a middle word changed: 4/6 = 67%
        "a chef in paris , i am",  # 3/6
    ])]
    reasons = CopyFilter(0.8).objections(records)
    assert reasons[0] == "repeats 100% of the word pairs of donor persona sentence 0 'i work as a chef in paris .'"
    assert reasons[1].startswith("repeats 83% ")
    assert reasons[2:] == [None, None]
    # the own persona is not the copy filter's business: a negative restating it is kept
    assert CopyFilter(0.8).objections([record("x", rejected=RESTATES_PERSONA)]) == [None]


def test_degenerate_filter_reads_the_records_reasons():
    reasons = DegenerateFilter().objections([record("a", degenerate=("empty", "truncated")), record("b")])
    assert reasons == ["degenerate negative (empty, truncated)", None]


def test_verdict_counts_each_filters_flags_and_gives_a_drop_to_the_first_filter_in_order():
    records = [record("both", rejected="i am a chef .", chosen_logp=-1.0, rejected_logp=-40.0),  # copy and margin
               record("margin", chosen_logp=-1.0, rejected_logp=-40.0),
               record("kept", rejected_logp=-22.0)]
    verdict = judge_split(records, [CopyFilter(0.8), MarginFilter(5.0)])
    assert verdict["before"] == 3 and verdict["after"] == 1
    assert verdict["filters"] == {"copy": {"flagged": 1, "dropped": 1}, "margin": {"flagged": 2, "dropped": 1}}
    assert [reason["filter"] for reason in verdict["dropped"]["both"]] == ["copy", "margin"]
    assert set(verdict["dropped"]) == {"both", "margin"}


def test_prefs_filters_in_a_config(tmp_path):
    config = load_config([], ["prefs.filters=[degenerate, {kind: margin, nats: 3}, copy, nli]"])
    assert [f.settings() for f in config.prefs.filters] == [
        {"kind": "degenerate"}, {"kind": "margin", "nats": 3.0}, {"kind": "copy", "share": 0.8},
        {"kind": "nli", "classifier": None, "entailment": 0.5}]
    for override, message in [("prefs.filters=[{kind: nli, nats: 3}]", "prefs.filters[0].nats is not a setting of the 'nli'"),
                              ("prefs.filters=[margn]", "prefs.filters[0].kind must be one of"),
                              ("prefs.filters=[copy, copy]", "prefs.filters names a filter twice"),
                              ("prefs.filters=[{kind: copy, share: 0}]", "prefs.filters[0].share must lie in (0, 1]")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            load_config([], [override])
    # the resolved config a run writes reads back the same
    from pdpo_jax.config import dump_config

    (tmp_path / "c.yaml").write_text(dump_config(config))
    assert load_config(tmp_path / "c.yaml").prefs.filters == config.prefs.filters


def stored_folder(root: Path, records_by_split: dict[str, list[PreferenceRecord]]) -> Path:
    """A finished prefs folder holding `records_by_split`, one shard a split, as make-prefs leaves it."""
    prefs_dir = root / "prefs"
    splits = {}
    for split, records in records_by_split.items():
        write_shard(shard_path(prefs_dir, split, 0), records)
        splits[split] = {"examples": len(records), "records": len(records), "shards": 1, "skipped_too_long": [],
                         "degenerate_records": sum(bool(r.degenerate) for r in records),
                         "dropped": sum(r.dropped for r in records), "kept": sum(not r.dropped for r in records)}
    summary = {"splits": splits, "shuffled": True}
    atomic_write_json(prefs_dir / "summary.json", summary)
    atomic_write_json(prefs_dir / "settings.json", {"prefs": {}})
    mark_done(prefs_dir, summary)
    return prefs_dir


def synthetic_records() -> dict[str, list[PreferenceRecord]]:
    return {"train": [record("t0"), record("t1", rejected="i am a chef ."), record("t2", degenerate=("empty",)),
                      record("t3", chosen_logp=-1.0, rejected_logp=-50.0),
                      dataclasses.replace(record("t4", degenerate=("truncated",)), dropped=True)],
            "val": [record("v0", split="val"), record("v1", rejected="my car is red .", split="val")]}


def test_the_reader_leaves_filtered_pairs_out_and_dpo_refuses_other_filters(tmp_path, capsys):
    prefs_dir = stored_folder(tmp_path, synthetic_records())
    shards = {p: p.read_bytes() for p in prefs_dir.glob("*/shard-*.jsonl")}
    sections = [PairFilterSection("degenerate"), PairFilterSection("margin", nats=10.0), PairFilterSection("copy")]
    check_filters(prefs_dir, [])  # never filtered: the config without filters reads it
    with pytest.raises(PrefsError, match="filtered with \\[\\], the config asks"):
        check_filters(prefs_dir, sections)
    summary = apply_filters(prefs_dir, json.loads((prefs_dir / "summary.json").read_text()), sections)
    assert {p: p.read_bytes() for p in prefs_dir.glob("*/shard-*.jsonl")} == shards  # nothing resampled or rewritten
    train = summary["filters"]["splits"]["train"]
    # t4 was dropped while sampling, so the filters judge 4 train pairs: t2 degenerate, t3 margin, t1 copy
    assert (train["before"], train["after"]) == (4, 1)
    assert train["filters"] == {"degenerate": {"flagged": 1, "dropped": 1}, "margin": {"flagged": 1, "dropped": 1},
                                "copy": {"flagged": 1, "dropped": 1}}
    assert [r.example_id for r in read_records(prefs_dir, "train")] == ["t0"]
    assert [r.example_id for r in read_records(prefs_dir, "val")] == ["v0"]
    assert len(read_records(prefs_dir, "train", include_dropped=True)) == 5
    verdict = json.loads((prefs_dir / FILTERS_FILE).read_text())
    assert verdict["splits"]["val"]["dropped"]["v1"] == [
        {"filter": "copy", "why": "repeats 100% of the word pairs of donor persona sentence 1 'my car is red .'"}]
    assert json.loads((prefs_dir / "summary.json").read_text())["filters"] == summary["filters"]
    check_filters(prefs_dir, sections)
    with pytest.raises(PrefsError, match=r"the config asks for prefs.filters \[\{'kind': 'copy'"):
        check_filters(prefs_dir, sections[2:])

    # `pdpo data inspect` on the folder: per split, the pairs each filter flags and drops
    assert data_stage.main(["inspect", str(prefs_dir)]) == 0
    shown = json.loads(capsys.readouterr().out)[0]
    assert shown["format"] == "prefs" and shown["counts"]["train"]["after_filters"] == 1
    assert shown["filters"]["splits"]["val"]["copy"] == {"flagged": 1, "dropped": 1}
    assert shown["first_example"]["example_id"] == "t0"
    assert folder_overview(prefs_dir) == shown

    # A verdict of other records (the folder rebuilt under it) is refused by name.
    stale = json.loads((prefs_dir / FILTERS_FILE).read_text())
    stale["splits"]["train"]["dropped"]["t9"] = [{"filter": "copy", "why": "?"}]
    atomic_write_json(prefs_dir / FILTERS_FILE, stale)
    with pytest.raises(PrefsError, match="filters.json: made for other records of split 'train'"):
        read_records(prefs_dir, "train")


# ------------------------------------------------------------------------------------------------
# The nli filter with a real classifier

# What the tiny classifier is trained to say; the filter's premise is each sentence of the pair's
# own persona, its hypothesis the negative.
NLI_PAIRS = [
    (PERSONA[0], RESTATES_PERSONA, "entailment"),
    (PERSONA[1], RESTATES_PERSONA, "neutral"),
    (PERSONA[0], DONOR[0], "neutral"),
    (PERSONA[1], DONOR[0], "neutral"),
    (PERSONA[0], DONOR[1], "neutral"),
    (PERSONA[1], DONOR[1], "neutral"),
    (PERSONA[0], CONTRADICTS_PERSONA, "neutral"),
    (PERSONA[1], CONTRADICTS_PERSONA, "contradiction"),
]


@pytest.fixture(scope="module")
def nli_classifier(tmp_path_factory) -> Path:
    """A tiny classifier trained until it gives every pair of NLI_PAIRS its label (a few seconds)."""
    return train_tiny_classifier(tmp_path_factory.mktemp("nli"), NLI_PAIRS, [*PERSONA, *DONOR])


def test_the_nli_filter_drops_a_negative_that_restates_the_true_persona(nli_classifier, tmp_path):
    records = {"train": [record("restates", rejected=RESTATES_PERSONA),  # entailed by the own persona
                         record("donor", rejected=DONOR[0]),  # the donor's persona: what a negative should say
                         record("contradicts", rejected=CONTRADICTS_PERSONA)],
               "val": [record("v-donor", rejected=DONOR[1], split="val")]}
    prefs_dir = stored_folder(tmp_path, records)
    opened = []

    def open_nli(classifier):
        opened.append(classifier)
        loaded = load_classifier(classifier)
        return entailment_function(NliReward(loaded, max_length=NLI_MAX_LENGTH))

    sections = [PairFilterSection("nli", classifier=str(nli_classifier))]
    summary = apply_filters(prefs_dir, json.loads((prefs_dir / "summary.json").read_text()), sections, nli=open_nli)
    assert opened == [str(nli_classifier)]
    train = summary["filters"]["splits"]["train"]
    assert (train["before"], train["after"]) == (3, 2) and train["filters"]["nli"] == {"flagged": 1, "dropped": 1}
    assert summary["filters"]["splits"]["val"]["after"] == 1
    verdict = json.loads((prefs_dir / FILTERS_FILE).read_text())
    [reason] = verdict["splits"]["train"]["dropped"]["restates"]
    assert reason["filter"] == "nli" and reason["why"].startswith("entailed by persona sentence 0 'i love cats .'")
    assert [r.example_id for r in read_records(prefs_dir, "train")] == ["donor", "contradicts"]
    # a stricter threshold than the classifier's probability keeps the pair
    probability = float(reason["why"].split("P(entailment) ")[1].split(" ")[0])
    strict = [PairFilterSection("nli", classifier=str(nli_classifier), entailment=min(1.0, probability + 0.001))]
    if probability + 0.001 <= 1.0:
        summary = apply_filters(prefs_dir, summary, strict, nli=open_nli)
        assert summary["filters"]["splits"]["train"]["after"] == 3


@pytest.mark.parametrize("model_file", sorted((Path(__file__).parents[1] / "configs" / "paper").glob("[!_]*.yaml")),
                         ids=lambda p: p.stem)
def test_the_nli_filter_variant_stacks_on_every_paper_model_file(model_file):
    variant = Path(__file__).parents[1] / "configs" / "paper" / "variants" / "nli-filter.yaml"
    model, filtered = load_config(model_file), load_config([model_file, variant])
    assert filtered.run_dir == model.run_dir + "-nli-filter"
    assert [f.kind for f in filtered.prefs.filters] == ["degenerate", "nli"]
    assert filtered.nli.pairs and "eval-responses" in filtered.pipeline.stages
    assert filtered.prefs.sampler == model.prefs.sampler and filtered.dpo == model.dpo  # the model's own method


# ------------------------------------------------------------------------------------------------
# The stages: make-prefs filters a finished folder again, DPO reads only what the filters keep,
# eval-responses measures a run's test responses. Cost: one make-prefs run with tiny models (10 s)
# and the classifier fixture (22 s) on 2 cores; both several times that on a heavily shared machine.


@pytest.fixture(scope="module")
def prefs_run(shared_data, tmp_path_factory):
    from prefs_fixtures import corpus_text, staged_slice, tiny_llama_with_words, write_config

    from pdpo_jax.stages import make_prefs

    root = tmp_path_factory.mktemp("filtered-run")
    train, val, dialogues = staged_slice(shared_data, root / "data")
    model = tiny_llama_with_words(root, corpus_text(dialogues))
    config = write_config(root / "run.yaml", train=train, val=val, run_dir=root / "run", generator=model,
                          reference=model)
    assert make_prefs.main(["--config", str(config)]) == 0
    return config, root / "run" / "prefs"


def test_make_prefs_filters_a_finished_folder_again_without_resampling(prefs_run, nli_classifier, capsys):
    from pdpo_jax import cli
    from pdpo_jax.prefs import SPLITS
    from pdpo_jax.stages import make_prefs

    config, prefs_dir = prefs_run
    records = {split: read_records(prefs_dir, split) for split in SPLITS}
    shards = {p: p.read_bytes() for p in prefs_dir.glob("*/shard-*.jsonl")}
    margins = sorted(r.ref_chosen_logp - r.ref_rejected_logp for r in records["train"])
    nats = margins[len(margins) // 2]  # about half the train pairs are separated by more
    filters = (f"prefs.filters=[degenerate, {{kind: margin, nats: {nats}}}, copy, "
               f"{{kind: nli, classifier: {nli_classifier}, entailment: 0.5}}]")
    assert make_prefs.main(["--config", str(config), filters]) == 0
    out = capsys.readouterr().out
    assert "filtering the stored pairs" in out and "filters keep" in out
    assert {p: p.read_bytes() for p in prefs_dir.glob("*/shard-*.jsonl")} == shards
    verdict = json.loads((prefs_dir / FILTERS_FILE).read_text())
    classifier = load_classifier(nli_classifier)
    entailment = entailment_function(NliReward(classifier, max_length=128))
    for split in SPLITS:
        judged = records[split]
        entry = verdict["splits"][split]
        expected_margin = {r.example_id for r in judged if r.ref_chosen_logp - r.ref_rejected_logp > nats}
        expected_nli = {r.example_id for r, p in zip(judged, entailment([r.persona for r in judged],
                                                                         [r.rejected for r in judged])) if max(p) >= 0.5}
        flagged = {kind: {i for i, reasons in entry["dropped"].items() if kind in [x["filter"] for x in reasons]}
                   for kind in ("degenerate", "margin", "copy", "nli")}
        assert flagged["margin"] == expected_margin and flagged["nli"] == expected_nli
        assert flagged["degenerate"] == {r.example_id for r in judged if r.degenerate}
        assert entry["before"] == len(judged) and entry["after"] == len(judged) - len(entry["dropped"])
        kept = [r.example_id for r in read_records(prefs_dir, split)]
        assert kept == [r.example_id for r in judged if r.example_id not in entry["dropped"]]
    assert verdict["classifier"]["digest"].startswith("sha256:")
    assert json.loads((prefs_dir / "DONE").read_text())["filters"]["splits"]["train"]["after"] == \
        verdict["splits"]["train"]["after"]
    # the same filters again: nothing to do
    before = (prefs_dir / FILTERS_FILE).stat().st_mtime_ns
    assert make_prefs.main(["--config", str(config), filters]) == 0
    assert (prefs_dir / FILTERS_FILE).stat().st_mtime_ns == before
    # DPO with other filters than the folder's is refused before any model loads
    capsys.readouterr()
    assert cli.main(["dpo", "--config", str(config), "dpo.batch_size=8", "prefs.filters=[copy]"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("pdpo dpo: ") and "run `pdpo make-prefs` with this config" in error
    # no filters any more: every pair comes back
    assert make_prefs.main(["--config", str(config)]) == 0
    assert [r.example_id for r in read_records(prefs_dir, "train")] == [r.example_id for r in records["train"]]


def test_eval_responses_measures_a_runs_test_responses(nli_classifier, tmp_path, capsys):
    from pdpo_jax.config import load_config
    from pdpo_jax.evaluate.run_summary import write_summary
    from pdpo_jax.run_layout import RunLayout
    from pdpo_jax.stages import results as results_stage
    from pdpo_jax.stages.eval_responses import evaluate_run_responses
    from pdpo_jax.storage import atomic_write_jsonl

    layout = RunLayout(tmp_path / "run")

    def line(i, response):
        return {"id": f"d#{i}", "dialogue_id": "d", "persona": list(PERSONA), "history": ["hi"], "response": response,
                "model": "x", "reference": "hello", "stopped": True, "history_turns_dropped": 0}

    # per persona sentence, the classifier says: restates (entailment, neutral) -> +0.5; the donor's
    # sentence (neutral, neutral) -> 0; contradicts (neutral, contradiction) -> -0.5
    atomic_write_jsonl(layout.responses("sft"), [line(0, RESTATES_PERSONA), line(1, DONOR[0])])
    atomic_write_jsonl(layout.responses("dpo"), [line(0, CONTRADICTS_PERSONA), line(1, DONOR[0])])
    config = load_config([], [f"run_dir={layout.root}", f"rl.classifier={nli_classifier}"])
    reports = evaluate_run_responses(config)
    assert reports["sft"]["c_score"]["value"] == pytest.approx(25.0)  # (50 + 0) / 2
    assert reports["dpo"]["c_score"]["value"] == pytest.approx(-25.0)
    assert reports["dpo"]["contradiction_rate"]["value"] == pytest.approx(50.0)
    assert reports["sft"]["persona_copy_rate"]["value"] == pytest.approx(50.0)  # "i love cats ." verbatim
    assert json.loads(layout.response_metrics("sft").read_text()) == reports["sft"]
    assert (layout.response_metrics_dir / "DONE").exists()
    assert "eval-responses: already finished" in (evaluate_run_responses(config) and capsys.readouterr().out)
    summary = write_summary(layout).read_text()
    assert "## What the models say on the test turns" in summary and "| PseudoDPO | 2 | -25.0 [" in summary
    assert results_stage.main(["--out", str(tmp_path / "results"), "--response-metrics",
                               f"SFT={layout.response_metrics('sft')}"]) == 0
    assert "| SFT | 2 | 25.0 [" in (tmp_path / "results" / "responses.md").read_text()
    # a run without a classifier skips the step with one line
    bare = load_config([], [f"run_dir={tmp_path / 'bare'}"])
    assert evaluate_run_responses(bare) is None and "eval-responses: skipped" in capsys.readouterr().out
