"""The whole pipeline on the demo data with a tiny random model: every stage runs, the summary is
written, the exported model matches, and a rerun skips every finished stage."""

import json
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import load_torch_model, torch_logits
from prefs_fixtures import tiny_llama_with_words

from pdpo_jax.config import load_config
from pdpo_jax.data import load_dialogues, read_dnli
from pdpo_jax.stages.pipeline import STAGE_NAMES, run_pipeline

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pdpo_jax" / "resources" / "demo"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    texts = [s for d in load_dialogues(DEMO / "dialogues.txt") for s in (*d.persona, *(t.text for t in d.turns))]
    texts += [t for ex in read_dnli(DEMO / "dnli_eval.jsonl", protocol="all")
              for t in (*ex.persona, *ex.history, *(c for c, _ in ex.candidates))]
    model_dir = tiny_llama_with_words(tmp, texts + ["your persona : partner you system user assistant"])
    config = load_config(REPO / "configs" / "demo.yaml", [
        f"run_dir={tmp / 'run'}", f"model.path={model_dir}", f"data.train={DEMO / 'dialogues.txt'}",
        f"eval.dnli={DEMO / 'dnli_eval.jsonl'}", "sft.max_steps=3", "sft.eval_every=2", "dpo.max_steps=3",
        "dpo.eval_every=2", "prefs.max_new_tokens=6", "data.max_length=192",
        "mesh.data=4", "mesh.tensor=2",  # the eight test devices: training runs sharded
    ])
    run_pipeline(config)
    return config, model_dir


def test_every_stage_finishes_and_the_summary_compares_sft_with_dpo(finished_run):
    config, _ = finished_run
    run = Path(config.run_dir)
    for stage in ("sft", "prefs", "dpo", "eval/sft", "eval/dpo", "export"):
        assert (run / stage / "DONE").exists(), stage
    for model in ("sft", "dpo"):
        report = json.loads((run / "eval" / model / "dnli.json").read_text())
        for block in [report["overall"], *report["subsets"].values()]:
            assert sum(block["percentages"].values()) == pytest.approx(100.0)
    summary = (run / "summary" / "summary.md").read_text()
    assert "SFT" in summary and "DPO" in summary and (run / "summary" / "dnli.png").exists()
    dpo_done = json.loads((run / "dpo" / "DONE").read_text())
    assert dpo_done["start_check"].startswith("ok")  # step-0 loss ln 2: reference log-probs belong to the policy


def test_exported_model_gives_the_dpo_models_logits(finished_run):
    from pdpo_jax.model import Decoder, load_model

    config, _ = finished_run
    run = Path(config.run_dir)
    ours = load_model(run / "dpo" / "best")
    ids = np.array([[3, 8, 15, 4, 22, 9]], np.int32)
    positions = np.arange(ids.shape[1], dtype=np.int32)[None]
    logits, _ = Decoder(ours.config).apply({"params": ours.params}, ids, positions, np.ones_like(ids))
    reference = torch_logits(load_torch_model(run / "export" / "hf"), ids, np.ones_like(ids), positions)
    np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-4, rtol=0)


def test_rerun_skips_finished_stages(finished_run, capsys):
    config, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in Path(config.run_dir).rglob("DONE")}
    run_pipeline(config, STAGE_NAMES[:-1])
    assert {p: p.stat().st_mtime_ns for p in Path(config.run_dir).rglob("DONE")} == before
    assert "already finished" in capsys.readouterr().out
