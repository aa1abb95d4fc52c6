"""The preference study resumes from the repository: `scripts/run_study.py` treats a model whose
reports are all in the results folder as finished, reads the committed study.json under the run
root's, and does not run a learning-rate search run that the committed record holds. No model runs
here: the runner's `pdpo` calls are recorded and answered with DONE markers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def run_study(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # run_study imports its sibling run_reproduction
    import run_study

    yield run_study
    for name in ("run_study", "run_reproduction"):
        sys.modules.pop(name, None)


class RecordingRunner:
    """Records each stage it is asked to run and marks it done with `best_value`."""

    def __init__(self, best_value: float = 0.5):
        self.calls: list[str] = []
        self.best_value = best_value
        self.timings: dict = {}

    def stage(self, name: str, run_dir: Path, stage: str, *overrides: str, extra: tuple[str, ...] = ()) -> None:
        self.calls.append(name)
        done = run_dir / stage / "DONE"
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"best_value": self.best_value, "best_step": 90}))


def make_study(run_study, tmp_path, record: dict, search_steps: int = 90, runner=None):
    root, results = tmp_path / "runs", tmp_path / "results"
    (root / "main" / "sft").mkdir(parents=True)
    (root / "main" / "prefs").mkdir(parents=True)
    results.mkdir()
    args = argparse.Namespace(search_steps=search_steps, data=tmp_path / "data")
    study = run_study.Study(args, runner or RecordingRunner(), tmp_path / "rl.yaml", root, results, record)
    return study, root, results


def simpo(run_study):
    return next(row for row in run_study.ROWS if row.name == "simpo")


def test_a_resumed_record_reads_the_committed_one_under_this_machines(run_study, tmp_path):
    results, root = tmp_path / "results", tmp_path / "runs"
    results.mkdir()
    root.mkdir()
    (results / "study.json").write_text(json.dumps({"rates": {"rpo": 2e-5}, "rows": ["rpo"], "labels": {"rpo": "+RPO"}}))
    assert run_study.resumed_record(results, root) == {"rates": {"rpo": 2e-5}, "rows": ["rpo"], "labels": {"rpo": "+RPO"}}
    (root / "study.json").write_text(json.dumps({"rates": {"simpo": 1e-6}, "rows": ["simpo"]}))
    assert run_study.resumed_record(results, root) == {"rates": {"rpo": 2e-5, "simpo": 1e-6}, "rows": ["simpo"],
                                                       "labels": {"rpo": "+RPO"}}


def test_a_model_is_kept_only_when_all_its_reports_are_there(run_study, tmp_path):
    study, _, results = make_study(run_study, tmp_path, {})
    files = study.kept_files("simpo", row=True)
    assert {path.relative_to(results).as_posix() for path in files} == {
        "dnli/simpo/dnli.json", "responses/simpo.json", "responses/simpo.jsonl", "curves/simpo.jsonl",
        "rows/simpo-dpo-done.json"}
    for path in files:
        assert not study.kept("simpo", row=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    assert study.kept("simpo", row=True)
    assert "curves/base.jsonl" not in {p.relative_to(results).as_posix() for p in study.kept_files("base")}


def test_a_search_run_in_the_committed_record_is_not_run_again(run_study, tmp_path):
    searched = {f"{lr:g}": {"best_val_reward_accuracy": accuracy, "best_step": 90, "steps": 90}
                for lr, accuracy in zip(run_study.SEARCH_RATES, (0.6, 0.7, 0.65))}
    study, root, _ = make_study(run_study, tmp_path, {"search": {"simpo": searched}})
    chosen = study.row_rate(simpo(run_study), run_study.RunLayout(root / "main"), 2e-5)
    assert study.runner.calls == []
    assert chosen == run_study.SEARCH_RATES[1]


def test_a_search_of_another_length_runs_again_and_is_kept_as_it_goes(run_study, tmp_path):
    searched = {f"{lr:g}": {"best_val_reward_accuracy": 0.9, "best_step": 90, "steps": 90}
                for lr in run_study.SEARCH_RATES}
    study, root, results = make_study(run_study, tmp_path, {"search": {"simpo": searched}}, search_steps=5,
                                      runner=RecordingRunner(best_value=0.55))
    study.row_rate(simpo(run_study), run_study.RunLayout(root / "main"), 2e-5)
    assert study.runner.calls == [f"simpo search lr={lr:g}" for lr in run_study.SEARCH_RATES]
    kept = json.loads((results / "study.json").read_text())["search"]["simpo"]
    assert {entry["steps"] for entry in kept.values()} == {5}
    assert {entry["best_val_reward_accuracy"] for entry in kept.values()} == {0.55}
