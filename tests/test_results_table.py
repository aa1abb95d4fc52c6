"""`pdpo results`: the DNLI table of several models from their reports and per-example records, the
score shifts, the plots, and generated responses side by side."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pdpo_jax import cli
from pdpo_jax.evaluate.dnli import build_report, output_paths
from pdpo_jax.evaluate.dnli_shifts import score_shifts
from pdpo_jax.evaluate.response_examples import persona_copy
from pdpo_jax.storage import atomic_write_json, atomic_write_jsonl

SUBSETS = {"valid_havenot": 12, "valid_likedislike": 8}
CANDIDATES = ["hits", "entail", "rand", "contradict"]
MODELS = ("base", "sft", "pseudo-dpo", "wo-shuffle")


def write_eval(folder: Path, name: str, seed: int, shift: float = 0.0, ids: list[str] | None = None) -> Path:
    """A report + examples sidecar pair as eval-dnli writes them, for random top-ranked candidates."""
    rng = np.random.default_rng(seed)
    ids = ids or [f"{subset}:{i}" for subset, n in SUBSETS.items() for i in range(n)]
    records = []
    for example_id in ids:
        logps = [-10.0 + shift * (k == 0) for k in range(len(CANDIDATES))]  # only the gold moves
        top = int(rng.integers(len(CANDIDATES)))
        records.append({"id": example_id, "subset": example_id.split(":")[0], "predicted_index": top,
                        "predicted_category": CANDIDATES[top], "gold_rank": 1 + (top != 0),
                        "categories": CANDIDATES, "scores": logps, "logps": logps, "token_counts": [5] * 4})
    report = build_report(records, list(SUBSETS), model=name, protocol="31", scoring="sum")
    paths = output_paths(folder / name / "dnli.json")
    atomic_write_jsonl(paths["examples"], records)
    atomic_write_json(paths["json"], {**report, "files": {"examples": paths["examples"].name}})
    return paths["json"]


def run(argv, capsys):
    status = cli.main(argv)
    return status, capsys.readouterr().err


@pytest.fixture
def evals(tmp_path):
    return {name: write_eval(tmp_path, name, seed, shift=0.5 * seed) for seed, name in enumerate(MODELS)}


def model_args(evals):
    return [arg for name, path in evals.items() for arg in ("--model", f"{name}={path}")]


def test_the_table_of_four_models(tmp_path, evals, capsys):
    metrics = tmp_path / "sft_metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "split": "val", "loss": 3.0 - s}) + "\n" for s in range(3)))
    ppo_metrics = tmp_path / "rl_metrics.jsonl"
    ppo_metrics.write_text("".join(json.dumps({"step": s, "split": "train", "objective/scores": 0.1 * s, "objective/kl": s,
                                               "policy/clipfrac": 0.01, "loss/value": 1.0 / (s + 1)}) + "\n" for s in range(3)))
    out = tmp_path / "results"
    status, err = run(["results", *model_args(evals), "--reference", "sft", "--out", str(out),
                       "--bootstrap-samples", "300", "--curves", f"sft={metrics}", "--ppo-curves", f"rl={ppo_metrics}"],
                      capsys)
    assert status == 0, err
    table = json.loads((out / "table.json").read_text())
    assert [row["model"] for row in table["rows"]] == list(MODELS)
    assert table["groups"] == [*SUBSETS, "overall"] and table["reference"] == "sft"
    for row in table["rows"]:
        assert {g: row["groups"][g]["n"] for g in table["groups"]} == {**SUBSETS, "overall": 20}
        for group in row["groups"].values():
            assert list(group["percentages"]) == ["hits", "entail", "rand", "contradict"]
            assert sum(group["percentages"].values()) == pytest.approx(100.0)
            for key, (low, high) in group["intervals"].items():
                assert low <= group["percentages"][key] <= high
            for test in group["paired"].values():
                if row["model"] == "sft":
                    assert test is None
                else:
                    assert 0.0 <= test["p_value"] <= 1.0
                    assert test["interval"][0] <= test["difference"] <= test["interval"][1]
    markdown = (out / "table.md").read_text()
    assert "| pseudo-dpo | " in markdown and "overall Contradict@1" in markdown and "#### Paired against sft" in markdown
    assert "stratified" in markdown
    shifts = json.loads((out / "score_shifts.json").read_text())
    assert set(shifts["models"]) == {"base", "pseudo-dpo", "wo-shuffle"}
    # Only the gold's log-likelihood moves: pseudo-dpo (shift 1.0) against sft (shift 0.5).
    categories = shifts["models"]["pseudo-dpo"]["categories"]
    assert categories["hits"]["mean_change"] == pytest.approx(0.5)
    assert categories["contradict"]["mean_change"] == pytest.approx(0.0)
    assert categories["contradict"]["change_vs_gold"] == pytest.approx(-0.5)
    for png in ("dnli.png", "curves.png", "ppo_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_models_on_other_examples_are_refused(tmp_path, evals, capsys):
    other = write_eval(tmp_path / "other", "wo-shuffle", 7, ids=[f"valid_havenot:{i}" for i in range(12)]
                       + [f"valid_likedislike:{i + 1}" for i in range(8)])
    evals["wo-shuffle"] = other
    status, err = run(["results", *model_args(evals), "--out", str(tmp_path / "r")], capsys)
    assert status == 2 and err.count("\n") == 1
    assert str(output_paths(other)["examples"]) in err and "hold different examples" in err


def test_a_missing_sidecar_is_one_line_naming_it(tmp_path, evals, capsys):
    sidecar = output_paths(evals["sft"])["examples"]
    sidecar.unlink()
    status, err = run(["results", *model_args(evals), "--out", str(tmp_path / "r")], capsys)
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("pdpo results: ") and str(sidecar) in err and "missing" in err


def test_gzipped_sidecars_give_the_same_table_with_the_paths_as_given(tmp_path, evals, capsys, monkeypatch):
    """The committed results keep each sidecar as `<sidecar>.gz`; the table from those equals the
    one from the plain files, and its report/examples fields are the paths as given (relative ones
    stay relative, so a table recomputed from the repository is the same bytes on any machine)."""
    status, err = run(["results", *model_args(evals), "--out", str(tmp_path / "plain"), "--bootstrap-samples", "200"],
                      capsys)
    assert status == 0, err
    for path in evals.values():
        sidecar = output_paths(path)["examples"]
        sidecar.with_name(sidecar.name + ".gz").write_bytes(gzip.compress(sidecar.read_bytes(), mtime=0))
        sidecar.unlink()
    monkeypatch.chdir(tmp_path)
    relative = [arg for name in MODELS for arg in ("--model", f"{name}={name}/dnli.json")]
    status, err = run(["results", *relative, "--out", "gz", "--bootstrap-samples", "200"], capsys)
    assert status == 0, err
    plain, packed = (json.loads((tmp_path / out / "table.json").read_text()) for out in ("plain", "gz"))
    assert [(row["report"], row["examples"]) for row in packed["rows"]] == [
        (f"{name}/dnli.json", f"{name}/dnli.examples.jsonl.gz") for name in MODELS]
    for row in (*plain["rows"], *packed["rows"]):
        del row["report"], row["examples"]
    assert packed == plain


def test_paired_tests_against_a_second_reference(tmp_path, evals, capsys):
    """`--reference sft --reference pseudo-dpo`: the table against sft as with one reference, plus
    the paired tests a table against pseudo-dpo alone holds, under `paired_against`."""
    def table(*references):
        out = tmp_path / "-".join(references)
        status, err = run(["results", *model_args(evals), *(a for r in references for a in ("--reference", r)),
                           "--out", str(out), "--bootstrap-samples", "200"], capsys)
        assert status == 0, err
        return json.loads((out / "table.json").read_text()), (out / "table.md").read_text()

    both, markdown = table("sft", "pseudo-dpo")
    (against_sft, _), (against_dpo, _) = table("sft"), table("pseudo-dpo")
    extra = both.pop("paired_against")
    assert both == against_sft
    assert list(extra) == ["pseudo-dpo"] and "against pseudo-dpo" in extra["pseudo-dpo"]["test"]
    assert extra["pseudo-dpo"]["models"] == {row["model"]: {g: entry["paired"] for g, entry in row["groups"].items()}
                                             for row in against_dpo["rows"] if row["model"] != "pseudo-dpo"}
    assert "#### Paired against sft" in markdown and "#### Paired against pseudo-dpo" in markdown
    assert "| sft | overall |" in markdown.split("#### Paired against pseudo-dpo")[1]
    status, err = run(["results", *model_args(evals), "--reference", "sft", "--reference", "sft",
                       "--out", str(tmp_path / "twice")], capsys)
    assert status == 2 and "given twice" in err


def test_a_damaged_gzipped_sidecar_is_one_line_naming_it(tmp_path, evals, capsys):
    sidecar = output_paths(evals["sft"])["examples"]
    damaged = sidecar.with_name(sidecar.name + ".gz")
    damaged.write_bytes(gzip.compress(sidecar.read_bytes())[:40])
    sidecar.unlink()
    status, err = run(["results", *model_args(evals), "--out", str(tmp_path / "r")], capsys)
    assert status == 2 and err.count("\n") == 1
    assert str(damaged) in err and "gzip" in err


def test_a_sidecar_of_another_run_is_refused(tmp_path, evals, capsys):
    stale = write_eval(tmp_path / "stale", "sft", 99)
    output_paths(evals["sft"])["examples"].write_bytes(output_paths(stale)["examples"].read_bytes())
    status, err = run(["results", *model_args(evals), "--out", str(tmp_path / "r")], capsys)
    assert status == 2 and "does not match" in err and str(evals["sft"]) in err


def test_an_unknown_reference_is_a_usage_error(tmp_path, evals, capsys):
    status, err = run(["results", *model_args(evals), "--reference", "rl", "--out", str(tmp_path / "r")], capsys)
    assert status == 2 and "--reference 'rl'" in err


def test_score_shifts_by_hand():
    before = [{"id": "a", "categories": ["hits", "contradict", "contradict"], "logps": [-5.0, -4.0, -6.0], "gold_rank": 2},
              {"id": "b", "categories": ["hits", "contradict", "contradict"], "logps": [-3.0, -4.0, -5.0], "gold_rank": 1}]
    after = [{"id": "a", "categories": ["hits", "contradict", "contradict"], "logps": [-4.0, -4.5, -6.5], "gold_rank": 1},
             {"id": "b", "categories": ["hits", "contradict", "contradict"], "logps": [-2.0, -4.0, -5.0], "gold_rank": 1}]
    shifts = score_shifts(before, after)
    assert shifts["categories"]["hits"] == {"candidates": 2, "mean_change": 1.0, "change_vs_gold": 0.0}
    assert shifts["categories"]["contradict"]["mean_change"] == pytest.approx(-0.25)
    assert shifts["categories"]["contradict"]["change_vs_gold"] == pytest.approx(-1.25)
    assert shifts["mean_gold_rank"] == {"before": 1.5, "after": 1.0}


def test_the_compare_script_prints_the_library_table(tmp_path, evals, capsys):
    spec = importlib.util.spec_from_file_location("compare", Path(__file__).parents[1] / "scripts" / "compare_dnli_scores.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    paths = [str(output_paths(evals[name])["examples"]) for name in ("sft", "pseudo-dpo")]
    assert script.main([*paths, "SFT", "PseudoDPO"]) == 0
    printed = capsys.readouterr().out
    assert "20 examples; mean change of summed log-likelihood (PseudoDPO - SFT)" in printed
    assert "| hits | 20 | +0.5000 | +0.0000 |" in printed


def test_persona_copy_counts_the_word_pairs_a_response_repeats():
    persona = ["i like to ski .", "my dog is named rex"]
    assert persona_copy(persona, "I like to ski!") == 1.0  # case and punctuation aside, verbatim
    assert persona_copy(persona, "do you like to read?") == pytest.approx(1 / 3)  # "like to" of 3 pairs
    assert persona_copy(persona, "my dog rex is named after me") == pytest.approx(2 / 4)  # "my dog", "is named"
    assert persona_copy(persona, "hello there") == 0.0
    assert persona_copy(["hi", ""], "hi there") == 0.0  # one-word sentences hold no pair


def test_generated_examples_side_by_side(tmp_path, capsys):
    conversations = [{"id": f"c{i}", "persona": [f"i like {i} cats ."], "history": ["hi", "hello | there", f"q{i}?"]}
                     for i in range(6)]
    talks = tmp_path / "talks.jsonl"
    atomic_write_jsonl(talks, conversations)
    files = {}
    for model in ("SFT", "PseudoDPO"):
        files[model] = tmp_path / f"{model}.jsonl"
        atomic_write_jsonl(files[model], [{**c, "response": f"{model} answer {c['id']}", "stopped": True} for c in conversations])
    out = tmp_path / "r"
    status, err = run(["results", "--conversations", str(talks), *(a for m, p in files.items() for a in ("--responses", f"{m}={p}")),
                       "--examples", "3", "--out", str(out)], capsys)
    assert status == 0, err
    text = (out / "examples.md").read_text()
    assert text.count("### Example ") == 3 and text.count("| **Persona** |") == 3
    shown = [line.split(": ")[1] for line in text.splitlines() if line.startswith("### Example")]
    assert shown == sorted(shown)  # in file order
    assert f"| **SFT** | SFT answer {shown[0]} |" in text and f"| **PseudoDPO** | PseudoDPO answer {shown[0]} |" in text
    assert "Self: hi<br>Partner: hello \\| there<br>Self:" not in text  # the last line is the partner's
    assert "Partner: hi<br>Self: hello \\| there<br>Partner: q" in text
    assert "| SFT | 6 | 0.000 | 0 (0.0%) |" in text  # no response repeats "i like N cats"
    # A response file written for other inputs is refused, naming the file and line.
    atomic_write_jsonl(files["SFT"], [{**c, "history": ["other"], "response": "x"} for c in conversations])
    status, err = run(["results", "--conversations", str(talks), "--responses", f"SFT={files['SFT']}", "--out", str(out)], capsys)
    assert status == 2 and f"{files['SFT']}:" in err and "differs" in err
