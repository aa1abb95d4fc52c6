"""Every error a user can cause reaches them as one line `pdpo <stage>: <message>` with exit status 2;
`--debug` shows the traceback instead."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
import yaml
from model_fixtures import make_tiny_hf_model
from prefs_fixtures import tiny_llama_with_words

from pdpo_jax import cli
from pdpo_jax.run_layout import RunLayout
from pdpo_jax.stages import DEFAULT_PIPELINE, PIPELINE_STEPS, STAGES

CONFIG_STAGES = {  # stage -> the other arguments it needs to get as far as reading the config
    "sft": [],
    "make-prefs": [],
    "dpo": [],
    "rounds": [],
    "train-nli": [],
    "rl": [],
    "eval-dnli": ["--out", "report.json"],
    "eval-responses": [],
    "test-responses": [],
    "judge": ["--responses", "a.jsonl", "b.jsonl", "--out", "judged"],
    "export-hf": [],
    "pipeline": [],
    "plan": ["--topology", "v4-8"],
    "serve": [],
}
FLAG_ONLY_STAGES = ("default-model", "data", "generate", "results", "annotate", "eval-nli")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.err


def assert_one_line(error: str, stage: str, *fragments: str) -> None:
    assert error.count("\n") == 1 and error.endswith("\n"), error
    assert error.startswith(f"pdpo {stage}: "), error
    assert "Traceback" not in error
    for fragment in fragments:
        assert fragment in error, error


def test_every_stage_is_covered():
    assert set(CONFIG_STAGES) | set(FLAG_ONLY_STAGES) == set(STAGES)


def test_every_declaration_names_what_runs_it(tmp_path):
    """`pdpo <stage>`, the pipeline's steps and the declared paths all resolve: a declaration
    cannot name a module, a function or a place in the run directory that is not there."""
    layout = RunLayout(tmp_path / "run")
    for stage in STAGES.values():
        module = stage.load()
        assert callable(module.main), stage.name
        assert stage.run is None or callable(getattr(module, stage.run)), stage.name
        if stage.arguments == "config":
            assert stage.name in CONFIG_STAGES and stage.run is not None, stage.name
        for path in (*stage.reads(layout), *stage.writes(layout)):
            assert path.is_relative_to(layout.root), (stage.name, path)
    for step in PIPELINE_STEPS.values():
        assert callable(STAGES[step.stage].function(step.function)), step.name
    assert set(DEFAULT_PIPELINE) <= set(PIPELINE_STEPS)


@pytest.mark.parametrize("stage", sorted(CONFIG_STAGES))
def test_a_typo_in_the_config_is_one_line(stage, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "sft": {"epochz": 3}}))
    status, error = run_cli([stage, "--config", str(config), *CONFIG_STAGES[stage]], capsys)
    assert status == 2
    assert_one_line(error, stage, str(config), "sft.epochz")


VALID_ARGUMENTS = {  # what each stage needs besides the bad flag, so that argparse gets as far as the flags
    **{stage: ["--config", "run.yaml"] for stage in ("sft", "make-prefs", "dpo", "rounds", "test-responses",
                                                     "train-nli", "rl", "pipeline", "plan")},
    "eval-nli": ["--model", "classifier", "--data", "pairs.txt"],
    "eval-dnli": ["--out", "report.json"],
    "eval-responses": ["--responses", "r.jsonl"],
    "judge": ["--responses", "a.jsonl", "b.jsonl", "--out", "judged"],
    "data": ["inspect", "file.txt"],
    "results": ["--out", "results"],
    "annotate": ["export", "--db", "study.db", "--out", "votes.jsonl"],
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_bad_flag_is_one_line(stage, capsys):
    status, error = run_cli([stage, *VALID_ARGUMENTS.get(stage, []), "--no-such-flag"], capsys)
    assert status == 2
    assert_one_line(error, stage, "--no-such-flag", f"pdpo {stage} --help")


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    status, error = run_cli(["sft", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert status == 2
    assert_one_line(error, "sft", "config file not found", "missing.yaml")


def test_a_bad_model_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "not_a_model").mkdir()
    status, error = run_cli(["generate", "--model", str(tmp_path / "not_a_model"), "--persona", "i like tea ."], capsys)
    assert status == 2
    assert_one_line(error, "generate", "not_a_model", "no config.json")
    status, error = run_cli(["export-hf", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], capsys)
    assert status == 2
    assert_one_line(error, "export-hf", "nowhere", "model directory not found")
    no_tokenizer = make_tiny_hf_model(tmp_path, "llama")
    capsys.readouterr()
    status, error = run_cli(["generate", "--model", str(no_tokenizer), "--persona", "i like tea ."], capsys)
    assert status == 2
    assert_one_line(error, "generate", str(no_tokenizer), "no tokenizer files")


def test_bad_data_names_the_file_and_line(tmp_path, capsys):
    model = tiny_llama_with_words(tmp_path, ["i like tea . hi there no tab problem"])
    capsys.readouterr()
    data = tmp_path / "dialogues.txt"
    data.write_text("1 your persona: i like tea.\n2 hi there\tno tab problem\nbroken line\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "model": {"path": str(model)},
                                      "data": {"train": [str(data)], "template": "plain-en"},
                                      "sft": {"batch_size": jax.device_count()}}))
    status, error = run_cli(["sft", "--config", str(config)], capsys)
    assert status == 2
    assert_one_line(error, "sft", f"{data}:3")


def test_eval_responses_names_what_it_lacks(tmp_path, capsys):
    status, error = run_cli(["eval-responses", "--responses", str(tmp_path / "r.jsonl")], capsys)
    assert status == 2
    assert_one_line(error, "eval-responses", "--responses needs --classifier DIR and --out REPORT.json")
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"id": "a", "persona": "i like tea .", "response": "hi"}\n')
    status, error = run_cli(["eval-responses", "--responses", str(bad), "--classifier", str(tmp_path),
                             "--out", str(tmp_path / "o.json")], capsys)
    assert status == 2
    assert_one_line(error, "eval-responses", f"{bad}:1", "'persona' must be a list of strings")


def test_debug_shows_the_traceback(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("sft: {epochz: 3}\n")
    with pytest.raises(ValueError, match="sft.epochz"):
        cli.main(["--debug", "sft", "--config", str(config)])


def test_an_unknown_stage_is_one_line(capsys):
    status, error = run_cli(["sfft"], capsys)
    assert status == 2 and error.count("\n") == 1 and "unknown stage 'sfft'" in error


def test_a_machine_without_tpu_chips_keeps_jax_off_libtpu():
    import importlib.util

    from pdpo_jax.cli import platforms_without_absent_tpus

    if importlib.util.find_spec("libtpu") is None:
        assert platforms_without_absent_tpus({}, []) is None  # nothing to keep JAX off
        return
    assert platforms_without_absent_tpus({}, []) in ("cpu", "cuda,cpu", "rocm,cpu")
    assert platforms_without_absent_tpus({}, ["/dev/accel0"]) is None  # a TPU VM: JAX finds its chips
    assert platforms_without_absent_tpus({"JAX_PLATFORMS": "cpu"}, []) is None  # the user's choice stands
    assert platforms_without_absent_tpus({}, [], gpu_plugins=[]) == "cpu"
    assert platforms_without_absent_tpus({}, [], gpu_plugins=["xla_cuda12"]) == "cuda,cpu"
    assert platforms_without_absent_tpus({}, [], gpu_plugins=["jax_rocm7_plugin"]) == "rocm,cpu"
    assert platforms_without_absent_tpus({}, [], gpu_plugins=["xla_metal"]) is None  # unknown kind: JAX decides
