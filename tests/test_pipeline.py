"""The whole pipeline on the demo data with a tiny random model: every stage runs, the summary is
written, the exported model matches, both models answer the same test turns, the judge stage is
skipped without a judge and judges those answers with one (a scripted server on 127.0.0.1), and a
rerun skips every finished stage."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from judge_fixtures import Reply, ScriptedJudgeServer
from model_fixtures import load_torch_model, torch_logits
from prefs_fixtures import tiny_llama_with_words

from pdpo_jax.annotation.items import study_items
from pdpo_jax.config import JudgeSection, load_config
from pdpo_jax.data import load_dialogues, read_dnli
from pdpo_jax.data.corpus import pick_test_turns, prepare_corpus
from pdpo_jax.evaluate.judge_pairs import common_ids, load_responses
from pdpo_jax.stages.pipeline import STAGE_NAMES, run_pipeline

TEST_TURNS = 4
KEY_ENV = "PDPO_TEST_PIPELINE_JUDGE_KEY"

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
        "test_responses.max_new_tokens=6", f"test_responses.max_examples={TEST_TURNS}",
        "mesh.data=4", "mesh.tensor=2",  # the eight test devices: training runs sharded
        "judge.serve=null",  # the judge stage's own server is tested in test_serve_judge.py
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


def test_both_models_answer_the_same_test_turns(finished_run):
    config, _ = finished_run
    folder = Path(config.run_dir) / "test_responses"
    assert (folder / "DONE").exists()
    sets = [load_responses(folder / f"{stage}.jsonl") for stage in ("sft", "dpo")]
    assert [s.model for s in sets] == ["SFT", "PseudoDPO"]
    turns = pick_test_turns(prepare_corpus(config.data, config.seed), TEST_TURNS, config.test_responses.seed)
    assert common_ids(sets) == [t.id for t in turns] and len(turns) == TEST_TURNS
    for line, turn in zip((folder / "sft.jsonl").read_text().splitlines(), turns):
        row = json.loads(line)
        assert (row["history"], row["reference"], row["persona"]) == (list(turn.history), turn.response, list(turn.persona))
        assert isinstance(row["stopped"], bool) and row["history_turns_dropped"] == 0


def shorter_response_wins(body: dict, attempt: int) -> Reply:
    """A judge with a taste that does not depend on the order it reads the responses in."""
    first, second = re.findall(r"\[Response [12]\]\n(.*?)\n\[End of Response", body["messages"][1]["content"], re.S)
    verdict = 3 if len(first) == len(second) else 1 if len(first) < len(second) else 2
    return Reply(text=f"the shorter one.\n[[{verdict}]]")


def test_the_judge_stage_is_skipped_without_a_judge_and_judges_the_test_responses_with_one(
        finished_run, capsys, monkeypatch):
    config, _ = finished_run
    run = Path(config.run_dir)
    run_pipeline(config, ("judge",))
    assert "judge: skipped, the config names no judge model" in capsys.readouterr().out
    assert not (run / "judge").exists()

    monkeypatch.setenv(KEY_ENV, "sk-test")
    with ScriptedJudgeServer(shorter_response_wins) as server:
        judged = dataclasses.replace(config, judge=JudgeSection(
            model="judge-test", base_url=server.base_url, api_key_env=KEY_ENV, timeout=10.0, bootstrap=50, plots=False))
        run_pipeline(judged, ("judge", "summary"))
        # Both orders of every pair. Where the two models said the same thing both orders are one
        # prompt, which the cache may answer the second time or, asked at once, may not.
        prompts = {json.dumps(body["messages"]) for body in server.requests}
        sft, dpo = (load_responses(run / "test_responses" / f"{name}.jsonl").records for name in ("sft", "dpo"))
        assert len(prompts) == sum(1 if sft[i]["response"] == dpo[i]["response"] else 2 for i in sft)
        asked = server.request_count
        assert len(prompts) <= asked <= 2 * TEST_TURNS
        run_pipeline(judged, ("judge",))
        assert server.request_count == asked and "judge: already finished" in capsys.readouterr().out
    results = json.loads((run / "judge" / "judge_results.json").read_text())
    assert (results["model_a"], results["model_b"]) == ("PseudoDPO", "SFT")
    assert results["status"]["judged"] == TEST_TURNS and sum(results["counts"].values()) == TEST_TURNS
    assert results["position_consistency"]["rate"] == 1.0
    assert (run / "judge" / "DONE").exists() and "## LLM judge on the test turns" in (run / "summary" / "summary.md").read_text()
    # A human study of the same pairs starts from this folder.
    items = study_items([str(run / "judge")])
    assert [(i.model_a, i.model_b) for i in items] == [("PseudoDPO", "SFT")] * TEST_TURNS


def test_rerun_skips_finished_stages(finished_run, capsys):
    config, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in Path(config.run_dir).rglob("DONE")}
    run_pipeline(config, STAGE_NAMES[:-1])
    assert {p: p.stat().st_mtime_ns for p in Path(config.run_dir).rglob("DONE")} == before
    assert "already finished" in capsys.readouterr().out
