"""Iterative DPO (`dpo.rounds`) on the demo data with a tiny random model: round 2's negatives are
sampled by round 1's best model (the digest in every record), with other seeds, and its DPO starts
from that model; evaluation and export take round 2's model; the summary and `pdpo results --rounds`
show both rounds; `pdpo rounds` killed with SIGKILL in round 2's DPO and rerun ends as the
uninterrupted run; one round leaves the layout and the pipeline as they were.

Cost: one module fixture runs SFT, two rounds of make-prefs + DPO (2 steps each), two DNLI
evaluations, the export and the summary on the tiny model; the kill test runs round 2 again, killed
in a subprocess and then to the end. Measured on the shared 2-core machine: fixture 46 s and kill
test 34 s (83 s for the file) when lightly loaded, 500 s and 78 s at a load average of ~40-60; the
other tests take well under 1 s.
"""

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from prefs_fixtures import tiny_llama_with_words

from pdpo_jax import cli
from pdpo_jax.config import ConfigError, load_config
from pdpo_jax.data import load_dialogues, read_dnli
from pdpo_jax.errors import ModelDirError
from pdpo_jax.evaluate.round_rows import round_rows
from pdpo_jax.model import load_model
from pdpo_jax.model.digest import model_digest
from pdpo_jax.prefs import read_records, read_summary
from pdpo_jax.run_layout import RunLayout, round_seed
from pdpo_jax.stages import DEFAULT_PIPELINE, default_pipeline
from pdpo_jax.stages.pipeline import run_pipeline
from pdpo_jax.stages.rounds import run_rounds
from pdpo_jax.train.checkpoints import TrainCheckpointer, read_best_info

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pdpo_jax" / "resources" / "demo"
DPO_STEPS, CHECKPOINT_EVERY = 2, 1
TIMING_KEYS = {"tokens_per_s"}  # wall-clock figures, the only values allowed to differ between runs
PATH_FIELDS = ("generator", "reference")  # a record's model paths name its own run directory


def overrides(tmp: Path, model_dir: Path) -> list[str]:
    return [
        f"run_dir={tmp / 'run'}", f"model.path={model_dir}", f"data.train={DEMO / 'dialogues.txt'}",
        f"eval.dnli={DEMO / 'dnli_eval.jsonl'}", "sft.max_steps=2", "sft.eval_every=2", "prefs.max_new_tokens=6",
        f"dpo.max_steps={DPO_STEPS}", "dpo.eval_every=2", f"dpo.checkpoint_every={CHECKPOINT_EVERY}",
        "dpo.optimizer.learning_rate=1e-3", "dpo.rounds=2", "mesh.data=4", "mesh.tensor=2",
    ]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rounds")
    texts = [s for d in load_dialogues(DEMO / "dialogues.txt") for s in (*d.persona, *(t.text for t in d.turns))]
    texts += [t for ex in read_dnli(DEMO / "dnli_eval.jsonl", protocol="all")
              for t in (*ex.persona, *ex.history, *(c for c, _ in ex.candidates))]
    model_dir = tiny_llama_with_words(tmp, texts + ["your persona : partner you system user assistant"])
    config_file, extra = str(REPO / "configs" / "demo.yaml"), overrides(tmp, model_dir)
    config = load_config(config_file, extra)
    layout = RunLayout.of(config)
    run_pipeline(config, ("sft", "make-prefs", "dpo", "rounds", "eval-dpo", "export-hf"))
    # Round 1's model ranked too, where the summary looks for an earlier round's report.
    assert cli.main(["eval-dnli", "--config", config_file, *extra, "--model", str(layout.round_best_model(1)),
                     "--name", "DPO round 1", "--out", str(layout.round_dnli_report(1, 2)), "--quiet"]) == 0
    run_pipeline(config, ("summary",))
    return {"config": config, "layout": layout, "tmp": tmp, "args": ["--config", config_file, *extra]}


def test_round_2_samples_its_negatives_with_round_1s_best_model(two_rounds):
    layout, config = two_rounds["layout"], two_rounds["config"]
    round_1_best = layout.round_best_model(1)
    digest = model_digest(load_model(round_1_best))
    records = [r for split in ("train", "val") for r in read_records(layout.round_folder(2) / "prefs", split)]
    assert records
    assert {(r.generator, r.generator_digest) for r in records} == {(str(round_1_best), digest)}
    assert {(r.reference, r.reference_digest) for r in records} == {(str(round_1_best), digest)}  # round_reference: previous
    first = {r.example_id: r for split in ("train", "val") for r in read_records(layout.prefs, split)}
    assert {r.generator_digest for r in first.values()} != {digest}  # round 1 sampled with the SFT model
    # Other seeds: no sampling seed in common, other donors, and the settings say which prefs.seed.
    assert not {r.sample_seed for r in records} & {r.sample_seed for r in first.values()}
    assert any(r.donor_dialogue_id != first[r.example_id].donor_dialogue_id for r in records)
    assert read_summary(layout.round_folder(2) / "prefs")["seed"] == round_seed(config.prefs.seed, 2) != config.prefs.seed


def test_round_2_trains_from_round_1s_model_and_starts_at_ln_2(two_rounds):
    layout, config = two_rounds["layout"], two_rounds["config"]
    round_2 = layout.dpo_round(config, 2)
    data = json.loads(round_2.data_summary.read_text())
    assert data["policy_init"] == str(layout.round_best_model(1)) and data["round"] == 2
    assert data["seed"] == round_seed(config.seed, 2)
    done = json.loads((round_2.dpo / "DONE").read_text())
    assert done["start_check"].startswith("ok"), done["start_check"]  # the stored log-probs are the start model's
    assert TrainCheckpointer(round_2.dpo / "checkpoints").latest_step() == DPO_STEPS


def test_evaluation_and_export_take_the_last_rounds_model(two_rounds):
    layout, config = two_rounds["layout"], two_rounds["config"]
    assert layout.trained_model(config, "dpo") == layout.round_best_model(2)
    round_2 = model_digest(load_model(layout.round_best_model(2)))
    assert model_digest(load_model(layout.exported_model)) == round_2 != model_digest(load_model(layout.round_best_model(1)))
    last, first = (json.loads(layout.round_dnli_report(k, 2).read_text()) for k in (2, 1))
    assert last["overall"]["n"] == first["overall"]["n"] > 0


def test_the_summary_and_pdpo_results_show_each_round(two_rounds, tmp_path):
    layout = two_rounds["layout"]
    rows = round_rows(layout)
    assert [row["round"] for row in rows] == [1, 2] and all(row["finished"] for row in rows)
    for row, folder in zip(rows, (layout.prefs, layout.round_folder(2) / "prefs")):
        splits = read_summary(folder)["splits"]
        assert row["pairs_kept"] == {split: counts["kept"] for split, counts in splits.items()}
        assert row["last_step"] == DPO_STEPS and row["curve_end"]["val/rewards/accuracies"] is not None
        assert row["dnli"] is not None and sum(row["dnli"].values()) == pytest.approx(100.0)
    assert rows[1]["generator"]["path"] == str(layout.round_best_model(1))
    summary = layout.summary_markdown.read_text()
    assert "## Rounds of DPO" in summary and f"`{layout.round_best_model(1)}`" in summary

    assert cli.main(["results", "--rounds", str(layout.root), "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "rounds.json").read_text()) == rows
    table = (tmp_path / "rounds.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "round" not in line
            and "---" not in line] == ["1", "2"]


KILLER = """
import os, signal, sys
from pdpo_jax import cli, metrics_log
kill_after, write = int(sys.argv[1]), metrics_log.MetricsLog.write
def write_then_die(self, step, split, values):  # killed once a step past the last checkpoint is logged
    write(self, step, split, values)
    if split == "train" and step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
metrics_log.MetricsLog.write = write_then_die
sys.exit(cli.main(["rounds", *sys.argv[2:]]))
"""


def saved_state(checkpoints: Path, step: int) -> dict[str, np.ndarray]:
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(checkpoints / str(step) / "state")
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def lines_of(stage_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def records_of(prefs_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.to_json().items() if k not in PATH_FIELDS}
            for split in ("train", "val") for r in read_records(prefs_dir, split, include_dropped=True)]


def test_pdpo_rounds_killed_in_round_2_and_rerun_ends_as_the_uninterrupted_run(two_rounds, subprocess_env):
    straight = two_rounds["layout"]
    resumed = RunLayout(two_rounds["tmp"] / "killed")
    resumed.root.mkdir()
    for stage in ("sft", "prefs", "dpo"):  # round 1 as the uninterrupted run finished it
        (resumed.root / stage).symlink_to(straight.root / stage, target_is_directory=True)
    args = [*two_rounds["args"], f"run_dir={resumed.root}"]
    env = dict(subprocess_env, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    killed = subprocess.run([sys.executable, "-c", KILLER, str(CHECKPOINT_EVERY + 1), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    dpo = resumed.round_folder(2) / "dpo"
    assert TrainCheckpointer(dpo / "checkpoints").latest_step() == CHECKPOINT_EVERY and not (dpo / "DONE").exists()
    assert max(row["step"] for row in lines_of(dpo)) == CHECKPOINT_EVERY + 1  # logged past the checkpoint

    assert cli.main(["rounds", *args]) == 0  # the same command again
    expected_dir = straight.round_folder(2) / "dpo"
    expected, actual = saved_state(expected_dir / "checkpoints", DPO_STEPS), saved_state(dpo / "checkpoints", DPO_STEPS)
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)
    assert lines_of(dpo) == lines_of(expected_dir)
    assert read_best_info(dpo / "best") == read_best_info(expected_dir / "best")
    assert records_of(resumed.round_folder(2) / "prefs") == records_of(straight.round_folder(2) / "prefs")


def test_one_round_keeps_the_layout_and_the_pipeline_and_pdpo_rounds_does_nothing(tmp_path, capsys):
    config = load_config(REPO / "configs" / "demo.yaml", [f"run_dir={tmp_path / 'run'}"])
    layout = RunLayout.of(config)
    first = layout.dpo_round(config, 1)
    assert (first.prefs, first.dpo, first.best_model) == (layout.prefs, layout.stage("dpo"), layout.best_model("dpo"))
    assert (first.generator, first.reference, first.start) == (str(layout.best_model("sft")),) * 3
    assert first.prefs_config(config) is config and first.seed == config.seed
    assert layout.trained_model(config, "dpo") == layout.best_model("dpo")
    assert default_pipeline(config) == DEFAULT_PIPELINE
    assert run_rounds(config) == {} and not layout.root.exists()
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(ValueError, match="dpo.rounds"):
        layout.dpo_round(config, 2)


def test_later_rounds_take_their_reference_by_setting_and_need_the_previous_round(tmp_path):
    config = load_config(REPO / "configs" / "demo.yaml",
                         [f"run_dir={tmp_path / 'run'}", "dpo.rounds=3", "dpo.round_reference=sft"])
    layout = RunLayout.of(config)
    third = layout.dpo_round(config, 3)
    assert third.prefs == tmp_path / "run" / "round-3" / "prefs" and third.dpo == tmp_path / "run" / "round-3" / "dpo"
    assert (third.generator, third.start) == (str(layout.round_best_model(2)),) * 2
    assert third.reference == str(layout.best_model("sft"))
    assert len({round_seed(0, k) for k in (1, 2, 3)}) == 3
    previous = dataclasses.replace(config, dpo=dataclasses.replace(config.dpo, round_reference="previous"))
    assert layout.dpo_round(previous, 3).reference == str(layout.round_best_model(2))
    assert default_pipeline(config) == ("sft", "make-prefs", "dpo", "rounds", *DEFAULT_PIPELINE[3:])
    with pytest.raises(ModelDirError, match="run pdpo dpo first"):
        run_rounds(config)
    for bad in ("dpo.rounds=0", "dpo.round_reference=first"):
        with pytest.raises(ConfigError, match=r"dpo\.round"):
            load_config(REPO / "configs" / "demo.yaml", [bad])


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs" / "paper").glob("[!_]*.yaml")))
def test_the_iterative_variant_stacks_on_every_paper_model_file(path):
    from pdpo_jax.stages.pipeline import stages_to_run

    model = REPO / "configs" / "paper" / path
    plain = load_config(model)
    iterative = load_config([model, REPO / "configs" / "paper" / "variants" / "iterative.yaml"])
    assert (iterative.dpo.rounds, iterative.dpo.round_reference) == (3, "previous")
    assert iterative.run_dir == plain.run_dir + "-iterative" and iterative.dpo.optimizer == plain.dpo.optimizer
    stages = stages_to_run(iterative)
    assert stages.index("dpo") + 1 == stages.index("rounds") < stages.index("eval-dpo")


def test_pdpo_results_rounds_names_a_bad_file_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["results", "--rounds", str(run), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"pdpo results: --rounds {run}: no DPO round found (no dpo/ folder in that run directory)\n"
    (run / "dpo").mkdir(parents=True)
    (run / "dpo" / "metrics.jsonl").write_text('{"step": 0, "split": "val", "loss": 0.69}\nnot json\n')
    assert cli.main(["results", "--rounds", str(run), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"pdpo results: {run / 'dpo' / 'metrics.jsonl'}:2: not valid JSON") and error.count("\n") == 1
