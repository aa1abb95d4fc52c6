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

Every step is a `pdpo` command, skipped when its output exists, so a rerun resumes. A finished
model's reports (DNLI records, responses and their metrics, validation curve, DONE record) are
copied into the results folder as soon as it finishes, and a model whose reports are all there is
not trained again: a study resumes from a checkout of the repository on another machine, and its
table is rewritten after every row. The rows base,
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
from pdpo_jax.storage import atomic_write_bytes

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
        """study.json under the run root, and its copy in results/, which another machine resumes from."""
        _write_json(self.root / "study.json", self.record)
        keep_json(self.root / "study.json", self.results / "study.json", self.root, self.args.data)

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

    def sft_dnli(self, main: RunLayout) -> None:
        self.runner.stage("eval-dnli sft", main.root, "pipeline", extra=("--stages", "eval-sft"))

    def keep_pseudo_dpo(self, main: RunLayout, search: dict, conversations: Path, nli: Path,
                        model_needed: bool = False) -> None:
        """+PseudoDPO, trained from main/'s pairs at DPO's rate and ranked, its reports kept. Trained
        after the rows that do not start from it (only the second round does, `model_needed`), so
        that a study cut short has its new rows first; nothing kept in results/ is recomputed."""
        if self.kept("pseudo-dpo") and not model_needed:
            return
        self.runner.stage("dpo", main.root, "pipeline", f"dpo.optimizer.learning_rate={search['dpo_learning_rate']}",
                          extra=("--stages", "dpo"))
        self.keep_model("pseudo-dpo", main.best_model("dpo"), main.dnli_report("dpo"), main.metrics("dpo"),
                        conversations, nli,
                        evaluate=lambda: self.runner.stage("eval-dnli pseudo-dpo", main.root, "pipeline",
                                                           extra=("--stages", "eval-dpo")))

    def classifier(self, main: RunLayout) -> Path:
        """The Dialogue NLI classifier of the RL(DialogueNLI) baseline: the NLI filter and eval-responses read it."""
        rl = RunLayout(self.root / "rl-dnli")
        _link(main.stage("sft"), rl.stage("sft"))
        self.runner.stage("train-nli", rl.root, "pipeline", extra=("--config", str(self.rl_config), "--stages", "train-nli"))
        return rl.nli

    # ------------------------------------------------------------------ the committed copies

    def kept_files(self, name: str, row: bool = False) -> list[Path]:
        """What results/ holds of model `name` once it is finished: its DNLI records, its responses to
        the test turns and their metrics, its validation curve (not for the untrained base model), and
        for a study row its DONE record (best step, the step-0 check)."""
        files = [self.results / "dnli" / name / "dnli.json", self.results / "responses" / f"{name}.json",
                 self.results / "responses" / f"{name}.jsonl"]
        if name != "base":
            files.append(self.results / "curves" / f"{name}.jsonl")
        if row:
            files.append(self.results / "rows" / f"{name}-dpo-done.json")
        return files

    def kept(self, name: str, row: bool = False) -> bool:
        """Whether model `name`'s reports are all in results/: a study resumes from them on another
        machine, retraining nothing they cover."""
        return all(path.is_file() for path in self.kept_files(name, row))

    def keep_model(self, name: str, model: Path | str, dnli_report: Path | None, metrics: Path | None,
                   conversations: Path, nli: Path, evaluate=None) -> None:
        """Model `name`'s reports copied into results/, each only where it is missing there: its DNLI
        records (after `evaluate()` where the run has none yet), its responses and their metrics,
        its curve (`metrics`: the stage's metrics.jsonl)."""
        dnli = self.results / "dnli" / name / "dnli.json"
        if dnli_report is not None and not dnli.is_file():
            if not dnli_report.is_file():
                evaluate()
            keep_dnli_records({name: dnli_report}, self.results / "dnli", self.root, self.args.data)
        kept = self.results / "responses"
        if not (kept / f"{name}.json").is_file() or not (kept / f"{name}.jsonl").is_file():
            report = self.responses(name, model, conversations, nli)
            kept.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.root / "examples" / f"{name}.jsonl", kept / f"{name}.jsonl")
            keep_json(report, kept / f"{name}.json", self.root, self.args.data)
        curve = self.results / "curves" / f"{name}.jsonl"
        if metrics is not None and not curve.is_file():
            curve.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(curve, metrics.read_bytes())

    def keep_row(self, row: Row, run: RunLayout, conversations: Path, nli: Path) -> None:
        """A finished row's reports in results/: those of every model, plus its DONE record, the
        filter's verdict (NLI filter) and the second round's pairs and round report (2 rounds)."""
        last = RunLayout(run.round_folder(row.rounds))
        records = self.results / "rows"
        records.mkdir(parents=True, exist_ok=True)
        if row.filtered:
            keep_json(run.prefs / FILTERS_FILE, records / f"{row.name}-filters.json", self.root, self.args.data)
        if row.rounds > 1:
            keep_json(last.prefs_summary, records / f"{row.name}-prefs-summary.json", self.root, self.args.data)
            self.runner.pdpo("results rounds", "results", "--out", str(records.resolve()), "--rounds", row.name,
                             cwd=self.root)  # from the run root, so the report names the run by its folder
            # what that command wrote, its model folders made relative to the run root
            report, table = records / "rounds.json", records / "rounds.md"
            keep_json(report, report, self.root, self.args.data)
            atomic_write_bytes(table, table.read_text().replace(f"{self.root}{os.sep}", "").encode())
        self.keep_model(row.name, run.round_best_model(row.rounds), run.dnli_report("dpo"), last.metrics("dpo"),
                        conversations, nli)
        keep_json(last.done("dpo"), records / f"{row.name}-dpo-done.json", self.root, self.args.data)  # last: marks it kept

    def test_conversations(self) -> Path:
        """The test turns every model answers: the committed copy where there is one (the same seeded pick)."""
        out = self.root / "examples" / "test_conversations.jsonl"
        committed = self.results / "responses" / "test_conversations.jsonl"
        if not out.exists():
            if committed.is_file():
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(committed, out)
            else:
                write_test_conversations(self.runner.config, self.args.overrides, out, self.args.test_turns)
        if not committed.is_file():
            committed.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(out, committed)
        return out

    def write_table(self) -> None:
        """table.json, table.md and the plots from what results/ holds now: every model whose DNLI
        records are kept, so the table grows row by row and needs no run folder."""
        results, labels = self.results, {row.name: row.label for row in ROWS}
        names = [name for name in ("base", "sft", "pseudo-dpo", "wo-shuffle", "rl", *labels)
                 if (results / "dnli" / name / "dnli.json").is_file()]
        answered = [name for name in names if (results / "responses" / f"{name}.json").is_file()]
        curves = [name for name in names if (results / "curves" / f"{name}.jsonl").is_file()]
        relative = Path(os.path.relpath(results, REPO))
        references = [arg for name in ("sft", "pseudo-dpo") if name in names for arg in ("--reference", name)]
        self.runner.pdpo("results", "results", "--out", str(relative), *references,
                         *[f"--model={name}={relative / 'dnli' / name / 'dnli.json'}" for name in names],
                         *[f"--response-metrics={name}={relative / 'responses' / f'{name}.json'}" for name in answered],
                         *[f"--curves={name}={relative / 'curves' / f'{name}.jsonl'}" for name in curves],
                         "--conversations", str(relative / "responses" / "test_conversations.jsonl"),
                         *[f"--responses={name}={relative / 'responses' / f'{name}.jsonl'}" for name in answered],
                         "--examples", "12")
        self.record["labels"] = {"base": "base", "sft": "SFT", "pseudo-dpo": "+PseudoDPO",
                                 "wo-shuffle": "+PseudoDPO w/o shuffle", "rl": "RL(DialogueNLI)",
                                 **{name: label for name, label in labels.items() if name in names}}
        self.record["reused"] = {name: "committed per-example records of the reproduction run"
                                 for name in REUSED if name in names}
        self.save()
        # this machine's wall times replace the committed ones of the same steps, and keep the others
        timings = results / "timings.json"
        committed = json.loads(timings.read_text()) if timings.is_file() else {}
        _write_json(timings, {**committed, **self.runner.timings})

    # ------------------------------------------------------------------ one row

    def row_rate(self, row: Row, main: RunLayout, dpo_lr: float) -> float:
        if not row.searched:
            return dpo_lr
        found = self.record.setdefault("search", {}).setdefault(row.name, {})
        for lr in SEARCH_RATES:
            run = RunLayout(self.root / f"{row.name}-lr{_rate(lr)}")
            info = _done(run, "dpo")
            if info is None and found.get(f"{lr:g}", {}).get("steps") == self.args.search_steps:
                continue  # searched on another machine: its figures are in the committed study.json
            if info is None:
                _link(main.stage("sft"), run.stage("sft"))
                _link(main.prefs, run.prefs)
                self.runner.stage(f"{row.name} search lr={lr:g}", run.root, "dpo", *row.overrides,
                                  f"dpo.optimizer.learning_rate={lr}", f"dpo.max_steps={self.args.search_steps}")
                info = _done(run, "dpo")
            found[f"{lr:g}"] = {"best_val_reward_accuracy": info["best_value"], "best_step": info["best_step"],
                                "steps": self.args.search_steps}
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


def resumed_record(results: Path, root: Path) -> dict:
    """study.json to go on from: the committed one (rates and searches of rows trained on another
    machine), updated by this machine's, one level deep (a row's rate joins the committed rates)."""
    record: dict = {}
    for path in (results / "study.json", root / "study.json"):
        if path.is_file():
            for key, value in json.loads(path.read_text()).items():
                record[key] = {**record[key], **value} if isinstance(value, dict) and isinstance(record.get(key), dict) \
                    else value
    return record


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
        study = Study(args, runner, Path(tmp) / rl_name, root, results, resumed_record(results, root))
        study.record.update(rows=[row.name for row in rows], search_rates=list(SEARCH_RATES),
                            search_steps=args.search_steps, dpo_learning_rate=search["dpo_learning_rate"],
                            sft_learning_rate=search["sft_learning_rate"])
        # rpo-like rows first, the rows that start from +PseudoDPO last
        to_train = sorted((row for row in rows if not study.kept(row.name, row=True)), key=lambda row: row.rounds > 1)
        for row in rows:
            if row not in to_train:
                print(f"== {row.name}: kept in {os.path.relpath(results)} (delete its files there to train it again)")
        missing = [name for name in ("sft", "pseudo-dpo", "base") if not study.kept(name)]
        if to_train or missing:
            main_run = study.sft_and_pairs(search)
            nli = study.classifier(main_run)
            conversations = study.test_conversations()
            study.keep_model("sft", main_run.best_model("sft"), main_run.dnli_report("sft"), main_run.metrics("sft"),
                             conversations, nli, evaluate=lambda: study.sft_dnli(main_run))
            for row in to_train:
                if row.rounds > 1:
                    study.keep_pseudo_dpo(main_run, search, conversations, nli, model_needed=True)
                run = study.train_row(row, main_run, nli, search["dpo_learning_rate"])
                study.keep_row(row, run, conversations, nli)
                study.write_table()
            study.keep_pseudo_dpo(main_run, search, conversations, nli)
            study.keep_model("base", "default", None, None, conversations, nli)
        study.write_table()
    print(f"runs in {root}; reports in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
