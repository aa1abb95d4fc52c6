"""The committed results recompute: `pdpo results`, run from the repository on the per-example
records kept in results/personachat-cpu/, gives that folder's table.json and table.md byte for
byte, and the table names its inputs by paths relative to the repository, never a machine's."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from pdpo_jax import cli

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "personachat-cpu"


@pytest.fixture
def committed_table():
    path = RESULTS / "table.json"
    if not path.is_file():
        pytest.skip(f"{path.relative_to(REPO)} is not in this checkout")
    return json.loads(path.read_text())


def test_the_table_names_its_inputs_relative_to_the_repository(committed_table):
    for row in committed_table["rows"]:
        for field in ("report", "examples"):
            assert not os.path.isabs(row[field]), (row["model"], field, row[field])
            assert (REPO / row[field]).is_file(), (row["model"], field, row[field])
    for name, report in committed_table.get("responses", {}).items():
        assert not os.path.isabs(report["file"]), (name, report["file"])


def test_the_committed_table_recomputes_byte_for_byte(committed_table, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    references = [committed_table["reference"], *committed_table.get("paired_against", {})]
    kept = RESULTS.relative_to(REPO)
    argv = ["results", "--out", str(tmp_path), "--bootstrap-samples", str(committed_table["bootstrap_samples"]),
            "--seed", str(committed_table["seed"]), *(arg for r in references for arg in ("--reference", r)),
            *(f"--model={row['model']}={row['report']}" for row in committed_table["rows"]),
            *(f"--response-metrics={name}={kept / 'responses' / f'{name}.json'}"
              for name in committed_table.get("responses", {}))]
    assert cli.main(argv) == 0, capsys.readouterr().err
    for name in ("table.json", "table.md"):
        assert (tmp_path / name).read_bytes() == (RESULTS / name).read_bytes(), name


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def test_no_committed_report_names_a_machine_folder():
    """Every JSON report under results/ gives paths relative to its run root, the repository or the
    data folder (PDPO_DATA), never one machine's absolute path."""
    reports = sorted((REPO / "results").rglob("*.json"))
    if not reports:
        pytest.skip("no results/ in this checkout")
    absolute = [(str(path.relative_to(REPO)), text) for path in reports
                for text in _strings(json.loads(path.read_text())) if text.startswith("/") and "/" in text[1:]]
    assert not absolute, absolute[:5]


def test_the_runner_rewrites_run_and_data_paths_only(tmp_path):
    spec = importlib.util.spec_from_file_location("run_reproduction", REPO / "scripts" / "run_reproduction.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    root, data = tmp_path / "runs" / "x", tmp_path / "data"
    record = {"best_dir": f"{root}/main/dpo/best", "files": [f"{data}/dnli/valid_havenot.jsonl", f"{root}"],
              "elsewhere": f"{tmp_path}/runs/xy/dpo", "text": "a/b", "step": 3}
    source, target = tmp_path / "done.json", tmp_path / "kept.json"
    source.write_text(json.dumps(record))
    runner.keep_json(source, target, root, data)
    assert json.loads(target.read_text()) == {
        "best_dir": "main/dpo/best", "files": ["PDPO_DATA/dnli/valid_havenot.jsonl", "."],
        "elsewhere": f"{tmp_path}/runs/xy/dpo", "text": "a/b", "step": 3}
