"""The run layout names the paths runs have always had, so existing run directories still read."""

from pathlib import Path

from pdpo_jax.config import load_config
from pdpo_jax.run_layout import RunLayout

REPO = Path(__file__).resolve().parents[1]


def test_every_artifact_is_where_runs_have_always_put_it(tmp_path):
    run = RunLayout(tmp_path)
    expected = {
        run.config: "config.yaml", run.pipeline_record: "pipeline.json",
        run.stage("sft"): "sft", run.best_model("dpo"): "dpo/best", run.metrics("rl"): "rl/metrics.jsonl",
        run.data_summary("sft"): "sft/data_summary.json", run.done("nli"): "nli/DONE",
        run.prefs: "prefs", run.prefs_split("val"): "prefs/val", run.prefs_summary: "prefs/summary.json",
        run.nli_classifier: "nli/classifier", run.nli_classifier_files: "nli/classifier_files",
        run.dnli_report("sft"): "eval/sft/dnli.json", run.evaluation("rl"): "eval/rl",
        run.responses("dpo"): "test_responses/dpo.jsonl", run.judge_results: "judge/judge_results.json",
        run.response_metrics("sft"): "eval_responses/sft.json", run.response_metrics_dir: "eval_responses",
        run.exported_model: "export/hf", run.summary_markdown: "summary/summary.md",
    }
    for path, relative in expected.items():
        assert path == tmp_path / relative


def test_which_model_a_stage_starts_from(tmp_path):
    config = load_config(REPO / "configs" / "demo.yaml", [f"run_dir={tmp_path}"])
    run = RunLayout.of(config)
    assert run.preference_models(config) == (str(tmp_path / "sft" / "best"),) * 2
    assert run.rl_policy(config) == tmp_path / "sft" / "best"
    assert run.rl_classifier(config) == tmp_path / "nli" / "classifier"
    config = load_config(REPO / "configs" / "demo.yaml", [
        f"run_dir={tmp_path}", "prefs.from_stage=rl", "prefs.reference=ref", "rl.policy=default", "rl.classifier=c"])
    assert run.preference_models(config) == (str(tmp_path / "rl" / "best"), "ref")
    assert run.rl_policy(config) == Path("default") and run.rl_classifier(config) == Path("c")
