"""The judge stage with `judge.serve`: it serves the bundled model in this process over the run's
mesh, judges a run's test responses through it offline, writes its tables and stops the server.

Cost: loading the bundled model and compiling a few shapes, then 2 test turns judged in both
orders with 12-token answers (about two minutes on two busy CPU cores).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pdpo_jax.config import load_config
from pdpo_jax.run_layout import RESPONDING_MODELS, RunLayout
from pdpo_jax.serve.in_process import KEY_ENV
from pdpo_jax.stages import PIPELINE_STEPS

REPO = Path(__file__).resolve().parents[1]
TURNS = [
    {"id": "d1-t1", "persona": ["i have two cats.", "i live in paris."], "history": ["hi! do you have pets?"]},
    {"id": "d2-t1", "persona": ["i am a chef.", "i hate the cold."], "history": ["what do you do for work?"]},
]
ANSWERS = {"sft": ["i have a dog.", "i am a teacher."], "dpo": ["yes, two cats!", "i cook in a restaurant."]}


def test_the_judge_stage_serves_its_judge_and_writes_its_tables(default_model_path, tmp_path):
    config = load_config(REPO / "configs" / "demo.yaml", [
        f"run_dir={tmp_path / 'run'}", f"judge.serve={default_model_path}", "judge.max_tokens=12",
        "judge.bootstrap=20", "judge.plots=false", "judge.timeout=600", "mesh.tensor=2"])  # served over data=4, tensor=2
    layout = RunLayout.of(config)
    layout.test_responses.mkdir(parents=True)
    for model, label in RESPONDING_MODELS.items():
        rows = [{**turn, "response": answer, "model": label} for turn, answer in zip(TURNS, ANSWERS[model])]
        layout.responses(model).write_text("".join(json.dumps(r) + "\n" for r in rows))

    results = PIPELINE_STEPS["judge"](config)

    assert results["status"]["failed"] == 0
    judged = json.loads(layout.judge_results.read_text())
    assert judged["mode"] == "pairwise" and judged["status"]["failed"] == 0
    assert (layout.judge / "judge_results.md").exists() and (layout.judge / "DONE").exists()
    assert judged["judge"]["model"] == "served-judge" and judged["requests_sent"] >= 2 * len(TURNS)  # both orders
    assert len((layout.judge / "judgments.jsonl").read_text().splitlines()) == len(TURNS)
    assert KEY_ENV not in os.environ  # the run's key is gone with its server
