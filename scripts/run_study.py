"""The preference study: from the reproduction's SFT model (configs/experiments/personachat-cpu.yaml:
150 PersonaChat train dialogues, the bundled 135M model), +PseudoDPO and five changes to it, each
ranked on DNLI (both subsets, 95% bootstrap intervals, paired tests against SFT and against
+PseudoDPO) and measured on what it says to the same test turns (`pdpo eval-responses` with the
run's Dialogue NLI classifier):

    rpo         +RPO: the DPO loss plus the chosen responses' NLL (alpha 1)
    simpo       +SimPO: length-normalised and reference-free (beta 2, gamma 1)
    orpo        +ORPO: the chosen responses' NLL plus the odds-ratio term (lambda 0.1)
    nli-filter  +PseudoDPO on the pairs the degenerate and NLI filters keep (entailed negatives dropped)
    rounds      +PseudoDPO, 2 rounds: fresh negatives sampled by the PseudoDPO model, DPO from it

    python scripts/run_study.py --data ../shared/data --root ../runs/personachat-cpu [--rows rpo,simpo]

Learning rates, on validation only (never DNLI), by the reproduction's rule (highest validation
reward accuracy of 90-step runs over 1e-6, 5e-6, 2e-5): SimPO and ORPO search their own, since
their losses are on other scales; RPO, the NLI filter and the second round train the DPO loss
(RPO adds an NLL term) and keep the rate DPO's search chose. The SFT and DPO rates are the ones
the reproduction's searches chose (results/personachat-cpu/search.json).

Every step is a `pdpo` command, skipped when its output exists, so a rerun resumes. The rows base,
+PseudoDPO w/o shuffle and RL(DialogueNLI) are not retrained: their committed per-example DNLI
records are used as they are (they come from the same SFT run; study.json says whether the
retrained SFT and PseudoDPO models reproduce theirs). Under --root, beside the reproduction's
folders: <row>/ (one run directory per row, sharing main's SFT model and pairs by symlink),
<row>-lr<LR>/ (search runs), rl-dnli/nli (the classifier) and examples/ (test turns, responses and
their metrics). The table is computed from the copies under results/personachat-cpu/, with paths
relative to the repository, so `pdpo results` run from there gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from run_reproduction import (REPO, Runner, _done, _link, _rate, _write_json, keep_dnli_records, keep_json,
                              resolved_configs, write_test_conversations)

from pdpo_jax.prefs.filters import FILTERS_FILE
from pdpo_jax.run_layout import RunLayout

SEARCH_RATES = (1e-6, 5e-6, 2e-5)
NLI_FILTERS = "prefs.filters=[degenerate, {kind: nli, entailment: 0.5}]"
REUSED = ("base", "wo-shuffle", "rl")  # committed records, not retrained


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    overrides: tuple[str, ...]
    searched: bool = False  # its own learning-rate search, else DPO's rate
    filtered: bool = False  # pairs re-judged by the NLI filter
    rounds: int = 1
    notes: str = ""


ROWS = (
    Row("rpo", "+RPO", ("dpo.loss_type=rpo", "dpo.beta=0.5", "dpo.rpo_alpha=1.0")),
    Row("simpo", "+SimPO", ("dpo.loss_type=simpo", "dpo.beta=2.0", "dpo.simpo_gamma=1.0"), searched=True),
    Row("orpo", "+ORPO", ("dpo.loss_type=orpo", "dpo.beta=0.1"), searched=True),
    Row("nli-filter", "+PseudoDPO, NLI filter", (NLI_FILTERS,), filtered=True),
    Row("rounds", "+PseudoDPO, 2 rounds", ("dpo.rounds=2", "dpo.round_reference=previous"), rounds=2),
)


@dataclass
class Study:
    args: argparse.Namespace
    runner: Runner
    rl_config: Path
    root: Path
    results: Path
    record: dict = field(default_factory=dict)

    def save(self) -> None:
        _write_json(self.root / "study.json", self.record)

    # ------------------------------------------------------------------ the shared start

    def sft_and_pairs(self, search: dict) -> RunLayout:
        """main/: the SFT model at the searched rate and its pseudo-preferences, which every row starts from."""
        lr = search["sft_learning_rate"]
        sft = RunLayout(self.root / f"sft-lr{_rate(lr)}")
        if _done(sft, "sft") is None:
            self.runner.stage(f"sft lr={lr:g}", sft.root, "sft", f"sft.optimizer.learning_rate={lr}")
        main = RunLayout(self.root / "main")
        _link(sft.stage("sft"), main.stage("sft"))
        committed = search["sft"][f"{lr:g}"]["best_val_loss"]
        self.record["sft_best_val_loss"] = {"now": _done(sft, "sft")["best_value"], "committed": committed}
        self.runner.stage("make-prefs", main.root, "make-prefs")
        self.save()
        return main

    def sft_dnli_and_pseudo_dpo(self, main: RunLayout, search: dict) -> None:
        """main/: the SFT model's DNLI and +PseudoDPO (trained and ranked), which the new rows are compared with.

        Run after the rows that do not need them (only the second round starts from +PseudoDPO), so that
        a study cut short has its new rows first."""
        self.runner.stage("eval-dnli sft", main.root, "pipeline", extra=("--stages", "eval-sft"))
        self.runner.stage("dpo", main.root, "pipeline", f"dpo.optimizer.learning_rate={search['dpo_learning_rate']}",
                          extra=("--stages", "dpo,eval-dpo"))

    def classifier(self, main: RunLayout) -> Path:
        """The Dialogue NLI classifier of the RL(DialogueNLI) baseline: the NLI filter and eval-responses read it."""
        rl = RunLayout(self.root / "rl-dnli")
        _link(main.stage("sft"), rl.stage("sft"))
        self.runner.stage("train-nli", rl.root, "pipeline", extra=("--config", str(self.rl_config), "--stages", "train-nli"))
        return rl.nli

    # ------------------------------------------------------------------ one row

    def row_rate(self, row: Row, main: RunLayout, dpo_lr: float) -> float:
        if not row.searched:
            return dpo_lr
        found = self.record.setdefault("search", {}).setdefault(row.name, {})
        for lr in SEARCH_RATES:
            run = RunLayout(self.root / f"{row.name}-lr{_rate(lr)}")
            _link(main.stage("sft"), run.stage("sft"))
            _link(main.prefs, run.prefs)
            if _done(run, "dpo") is None:
                self.runner.stage(f"{row.name} search lr={lr:g}", run.root, "dpo", *row.overrides,
                                  f"dpo.optimizer.learning_rate={lr}", f"dpo.max_steps={self.args.search_steps}")
            info = _done(run, "dpo")
            found[f"{lr:g}"] = {"best_val_reward_accuracy": info["best_value"], "best_step": info["best_step"]}
        self.save()
        return max(SEARCH_RATES, key=lambda lr: found[f"{lr:g}"]["best_val_reward_accuracy"])

    def train_row(self, row: Row, main: RunLayout, nli: Path, dpo_lr: float) -> RunLayout:
        lr = self.row_rate(row, main, dpo_lr)
        self.record.setdefault("rates", {})[row.name] = lr
        run = RunLayout(self.root / row.name)
        _link(main.stage("sft"), run.stage("sft"))
        overrides = (*row.overrides, f"dpo.optimizer.learning_rate={lr}")
        if row.filtered:
            # the same pairs, re-judged in place (make-prefs resamples nothing when its shards exist)
            if not run.prefs.exists():
                staging = run.root / ".prefs-copy"
                shutil.rmtree(staging, ignore_errors=True)
                shutil.copytree(main.prefs, staging, symlinks=False)
                os.replace(staging, run.prefs)
            _link(nli, run.nli)
            self.runner.stage(f"{row.name} filter", run.root, "make-prefs", *overrides,
                              extra=("--config", str(self.rl_config)))
        else:
            _link(main.prefs, run.prefs)
        if row.rounds > 1:
            _link(main.stage("dpo"), run.stage("dpo"))
            self.runner.stage(f"{row.name} train", run.root, "rounds", *overrides)
            self.runner.stage(f"{row.name} eval-dnli", run.root, "pipeline", *overrides, extra=("--stages", "eval-dpo"))
        else:
            self.runner.stage(f"{row.name} train", run.root, "pipeline", *overrides,
                              extra=(*(("--config", str(self.rl_config)) if row.filtered else ()),
                                     "--stages", "dpo,eval-dpo"))
        self.save()
        return run

    # ------------------------------------------------------------------ what the models say

    def responses(self, name: str, model: Path | str, conversations: Path, nli: Path) -> Path:
        """The model's greedy answers to the test turns and their eval-responses report."""
        out = self.root / "examples" / f"{name}.jsonl"
        if not out.exists():
            self.runner.pdpo(f"generate {name}", "generate", "--model", str(model), "--input", str(conversations),
                             "--output", str(out), "--sampler", "greedy", "--max-new-tokens", "32")
        report = self.root / "examples" / f"{name}.metrics.json"
        if not report.exists():
            # run from the run root, so the report names its responses file relative to it
            self.runner.pdpo(f"eval-responses {name}", "eval-responses", "--responses",
                             str(out.relative_to(self.root)), "--classifier", str((nli / "classifier").resolve()),
                             "--out", str(report.relative_to(self.root)), cwd=self.root)
        return report


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", required=True, type=Path, help="folder holding personachat/ and dnli/")
    parser.add_argument("--root", required=True, type=Path,
                        help="the reproduction's folder of run directories (outside the repo)")
    parser.add_argument("--results", type=Path, default=REPO / "results" / "personachat-cpu",
                        help="the committed reports: search.json is read from it, the rows' reports go to it")
    parser.add_argument("--rows", default=",".join(row.name for row in ROWS),
                        help=f"which rows, in order (default: all of {', '.join(row.name for row in ROWS)})")
    parser.add_argument("--search-steps", type=int, default=90,
                        help="optimizer steps of each learning-rate search run (the reproduction's DPO search: 90)")
    parser.add_argument("--test-turns", type=int, default=64, help="test turns every model answers")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides given to every stage (e.g. a smoke run: data.max_dialogues=4)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    by_name = {row.name: row for row in ROWS}
    unknown = [name for name in args.rows.split(",") if name not in by_name]
    if unknown:
        raise SystemExit(f"run_study.py: --rows: unknown {unknown}; rows are {list(by_name)}")
    rows = [by_name[name] for name in args.rows.split(",")]
    results = args.results.resolve()
    search = json.loads((results / "search.json").read_text())
    config_name, rl_name = "personachat-cpu.yaml", "personachat-cpu-rl.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        resolved_configs(args.data, Path(tmp))
        runner = Runner(argparse.Namespace(root=args.root, overrides=args.overrides), Path(tmp) / config_name)
        root = runner.root
        study = Study(args, runner, Path(tmp) / rl_name, root, results,
                      json.loads((root / "study.json").read_text()) if (root / "study.json").exists() else {})
        study.record.update(rows=[row.name for row in rows], search_rates=list(SEARCH_RATES),
                            search_steps=args.search_steps, dpo_learning_rate=search["dpo_learning_rate"],
                            sft_learning_rate=search["sft_learning_rate"])

        main_run = study.sft_and_pairs(search)
        nli = study.classifier(main_run)
        trained = {}
        for row in sorted(rows, key=lambda row: row.rounds > 1):  # the rows that start from +PseudoDPO last
            if row.rounds > 1:
                study.sft_dnli_and_pseudo_dpo(main_run, search)
            run = study.train_row(row, main_run, nli, search["dpo_learning_rate"])
            trained[row.name] = run.round_best_model(row.rounds)
        study.sft_dnli_and_pseudo_dpo(main_run, search)
        trained = {"sft": main_run.best_model("sft"), "pseudo-dpo": main_run.best_model("dpo"), **trained}

        conversations = root / "examples" / "test_conversations.jsonl"
        if not conversations.exists():
            write_test_conversations(runner.config, args.overrides, conversations, args.test_turns)
        metrics = {"base": study.responses("base", "default", conversations, nli)}
        metrics.update({name: study.responses(name, model, conversations, nli) for name, model in trained.items()})

        # the committed copies: DNLI records of the retrained models, responses and their metrics
        reports = {"sft": main_run.dnli_report("sft"), "pseudo-dpo": main_run.dnli_report("dpo"),
                   **{row.name: RunLayout(root / row.name).dnli_report("dpo") for row in rows}}
        keep_dnli_records(reports, results / "dnli", root, args.data)
        kept = results / "responses"
        kept.mkdir(parents=True, exist_ok=True)
        for name, report in metrics.items():
            keep_json(report, kept / f"{name}.json", root, args.data)
            shutil.copy2(root / "examples" / f"{name}.jsonl", kept / f"{name}.jsonl")
        shutil.copy2(conversations, kept / "test_conversations.jsonl")
        # every row's DONE record (best step, the step-0 check), the filter's verdict, the second round's pairs
        records = results / "rows"
        records.mkdir(parents=True, exist_ok=True)
        for row in rows:
            run = RunLayout(root / row.name)
            last = RunLayout(run.round_folder(row.rounds))
            keep_json(last.done("dpo"), records / f"{row.name}-dpo-done.json", root, args.data)
            if row.filtered:
                keep_json(run.prefs / FILTERS_FILE, records / f"{row.name}-filters.json", root, args.data)
            if row.rounds > 1:
                keep_json(last.prefs_summary, records / f"{row.name}-prefs-summary.json", root, args.data)
                runner.pdpo("results rounds", "results", "--out", str(records.resolve()), "--rounds", row.name,
                            cwd=root)  # from the run root, so the report names the run by its folder
        curves = {"sft": main_run.metrics("sft"), "pseudo-dpo": main_run.metrics("dpo"),
                  **{row.name: RunLayout(RunLayout(root / row.name).round_folder(row.rounds)).metrics("dpo") for row in rows}}
        reused = [name for name in REUSED if (results / "dnli" / name / "dnli.json").is_file()]
        names = ["base", "sft", "pseudo-dpo", "wo-shuffle", "rl", *(row.name for row in rows)]
        names = [name for name in names if name not in REUSED or name in reused]
        relative = Path(os.path.relpath(results, REPO))
        runner.pdpo("results", "results", "--out", str(relative), "--reference", "sft", "--reference", "pseudo-dpo",
                    *[f"--model={name}={relative / 'dnli' / name / 'dnli.json'}" for name in names],
                    *[f"--response-metrics={name}={relative / 'responses' / f'{name}.json'}" for name in metrics],
                    *[f"--curves={name}={path}" for name, path in curves.items()],
                    "--conversations", str(relative / "responses" / "test_conversations.jsonl"),
                    *[f"--responses={name}={relative / 'responses' / f'{name}.jsonl'}" for name in metrics],
                    "--examples", "12")
        study.record["labels"] = {"base": "base", "sft": "SFT", "pseudo-dpo": "+PseudoDPO",
                                  "wo-shuffle": "+PseudoDPO w/o shuffle", "rl": "RL(DialogueNLI)",
                                  **{row.name: row.label for row in rows}}
        study.record["reused"] = {name: "committed per-example records of the reproduction run" for name in reused}
        study.save()
    for name in ("study.json", "timings.json"):
        keep_json(root / name, results / name, root, args.data)
    print(f"runs in {root}; reports in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
