"""The RL(DialogueNLI) baseline end to end with a tiny random model, sharded over the eight test
devices: the rl-dnli variant stacked on the demo config runs SFT -> train-nli -> rl -> DNLI
evaluation -> summary by configuration alone; the PPO log has TRL's metric names with KL 0 and
ratio 1 where the policy is the reference; the best model has the highest validation reward; the
classifier is a transformers directory and `pdpo eval-nli` agrees with transformers on it; and a
`pdpo rl` killed with SIGKILL and rerun ends with the uninterrupted run's parameters and log.

The NLI pairs are synthetic (a persona sentence entails itself, is neutral to another dialogue's,
contradicted by its negation): they exercise the machinery, not the classifier's quality.
"""

from __future__ import annotations

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
from pdpo_jax.config import load_config
from pdpo_jax.data import load_dialogues, read_dnli, read_nli_pairs
from pdpo_jax.stages.pipeline import run_pipeline
from pdpo_jax.train.checkpoints import TrainCheckpointer, read_best_info

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pdpo_jax" / "resources" / "demo"
TIMING_KEYS = {"tokens_per_s"}
TRL_TRAIN_METRICS = {
    "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward", "objective/scores",
    "objective/kl_coef", "policy/clipfrac", "policy/approxkl", "policy/ratio", "loss/policy", "loss/value",
    "val/clipfrac", "val/vpred", "val/error",
}
RL_STEPS, CHECKPOINT_EVERY = 2, 1


def synthetic_pairs(dialogues, count: int) -> list[dict]:
    personas = [d.persona for d in dialogues]
    pairs = []
    for i, persona in enumerate(personas):
        for j, sentence in enumerate(persona):
            other = personas[(i + 1) % len(personas)][j % len(personas[(i + 1) % len(personas)])]
            pairs += [{"sentence1": sentence, "sentence2": sentence, "label": "positive", "id": f"e{i}.{j}"},
                      {"sentence1": sentence, "sentence2": other, "label": "neutral", "id": f"n{i}.{j}"},
                      {"sentence1": sentence, "sentence2": "no , " + sentence.replace("i ", "i never ", 1),
                       "label": "negative", "id": f"c{i}.{j}"}]
    return pairs[:count]


def rl_overrides(tmp: Path, model_dir: Path, pairs: Path) -> list[str]:
    return [
        f"run_dir={tmp / 'run'}", f"model.path={model_dir}", f"data.train={DEMO / 'dialogues.txt'}",
        f"eval.dnli={DEMO / 'dnli_eval.jsonl'}", "data.max_length=192", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
        "sft.max_steps=1",
        f"nli.pairs=[{pairs}]", "nli.val_pairs=[]", "nli.val_fraction=0.25", f"nli.model={model_dir}",
        "nli.batch_size=4", "nli.max_steps=3", "nli.eval_every=3", "nli.max_length=48",
        "nli.optimizer.learning_rate=1e-3",
        "rl.batch_size=8", "rl.mini_batch_size=4", "rl.ppo_epochs=2", f"rl.max_steps={RL_STEPS}", "rl.eval_every=1",
        f"rl.checkpoint_every={CHECKPOINT_EVERY}", "rl.max_new_tokens=6", "rl.max_val_examples=8",
        "rl.optimizer.learning_rate=1e-3",
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rl")
    dialogues = load_dialogues(DEMO / "dialogues.txt")
    pairs = synthetic_pairs(dialogues, 48)
    pair_file = tmp / "pairs.jsonl"
    pair_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))  # the official release's layout
    texts = [s for d in dialogues for s in (*d.persona, *(t.text for t in d.turns))]
    texts += [t for ex in read_dnli(DEMO / "dnli_eval.jsonl", protocol="all")
              for t in (*ex.persona, *ex.history, *(c for c, _ in ex.candidates))]
    texts += [p["sentence2"] for p in pairs] + ["your persona : partner you system user assistant no never"]
    model_dir = tiny_llama_with_words(tmp, texts)
    overrides = rl_overrides(tmp, model_dir, pair_file)
    config_files = [str(REPO / "configs" / "demo.yaml"), str(REPO / "configs" / "paper" / "variants" / "rl-dnli.yaml")]
    config = load_config(config_files, overrides)
    run_pipeline(config)  # the stage list comes from the variant's pipeline.stages
    return {"config": config, "files": config_files, "overrides": overrides, "pairs": pair_file, "tmp": tmp}


def lines_of(stage_dir: Path, split: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows if split in (None, row["split"])]


def test_the_variant_runs_sft_nli_rl_and_evaluation_and_the_summary_has_the_rl_row(finished_run):
    run = Path(finished_run["config"].run_dir)
    assert json.loads((run / "pipeline.json").read_text())["stages"] == [
        "sft", "train-nli", "rl", "eval-sft", "eval-rl", "summary"]
    for stage in ("sft", "nli", "rl", "eval/sft", "eval/rl"):
        assert (run / stage / "DONE").exists(), stage
    assert not (run / "prefs").exists() and not (run / "dpo").exists()
    assert json.loads((run / "eval" / "rl" / "dnli.json").read_text())["model"] == "RL"
    summary = (run / "summary" / "summary.md").read_text()
    assert "| overall | RL |" in summary and "| overall | SFT |" in summary
    assert (run / "summary" / "rl_curves.png").stat().st_size > 0 and "**rl**" in summary


def test_ppo_log_has_trls_names_kl_zero_and_ratio_one_where_the_policy_is_the_reference(finished_run):
    rl = Path(finished_run["config"].run_dir) / "rl"
    train = lines_of(rl, "train")
    assert [row["step"] for row in train] == list(range(1, RL_STEPS + 1))
    assert TRL_TRAIN_METRICS <= set(train[0])
    assert train[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # sampled by the reference itself
    assert train[0]["objective/non_score_reward"] == pytest.approx(0.0, abs=1e-6)
    for row in train:  # every rollout's first update: the policy that sampled, unmoved
        assert row["policy/ratio_first_update"] == pytest.approx(1.0, abs=1e-5)
    assert train[-1]["objective/kl"] != 0.0 and train[0]["objective/kl_coef"] == pytest.approx(0.2)
    assert json.loads((rl / "DONE").read_text())["start_check"].startswith("ok")
    assert any((rl / "tensorboard").iterdir())


def test_the_best_rl_model_has_the_highest_validation_reward(finished_run):
    rl = Path(finished_run["config"].run_dir) / "rl"
    val = lines_of(rl, "val")
    assert [row["step"] for row in val] == list(range(RL_STEPS + 1))  # the SFT model (step 0) is a candidate
    best = max(val, key=lambda row: row["objective/scores"])  # the first of equal values, as the loop keeps
    info = read_best_info(rl / "best")
    assert info["step"] == best["step"] and info["metric"] == "objective/scores"
    assert info["value"] == pytest.approx(best["objective/scores"])


def test_the_classifier_loads_in_transformers_and_eval_nli_agrees_with_it(finished_run, capsys, tmp_path):
    import torch
    import transformers
    from transformers import AutoTokenizer

    run = Path(finished_run["config"].run_dir)
    done = json.loads((run / "nli" / "DONE").read_text())
    assert set(done["val_accuracy"]) == {"overall", "contradiction", "neutral", "entailment"}
    classifier_dir = run / "nli" / "classifier"
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(classifier_dir, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    pairs = read_nli_pairs(finished_run["pairs"])
    with torch.no_grad():  # the input format of pdpo_jax.data.nli_batches, one pair at a time
        predicted = [torch_model.config.id2label[int(torch_model(
            **tokenizer(p.sentence1 + "\n" + p.sentence2, return_tensors="pt")).logits.argmax())] for p in pairs]
    capsys.readouterr()
    out = tmp_path / "report.json"
    assert cli.main(["eval-nli", "--model", str(classifier_dir), "--data", str(finished_run["pairs"]), "--out", str(out),
                     "--mesh", "data=2,fsdp=2,tensor=2", "--batch-size", "32"]) == 0  # the reward's jitted program
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["overall"]["correct"] == sum(p == g.label for p, g in zip(predicted, pairs))
    for label, block in printed["per_class"].items():
        rows = [i for i, g in enumerate(pairs) if g.label == label]
        assert block["n"] == len(rows) and block["correct"] == sum(predicted[i] == label for i in rows)


def test_a_rollout_trains_on_the_sampled_tokens_up_to_their_stop_and_rewards_their_text(finished_run):
    from pdpo_jax.data import PromptEncoder, examples_from_dialogues
    from pdpo_jax.generation import Temperature, decode_response, generate, split_at_stop, stop_sequences
    from pdpo_jax.model import load_model, pad_id
    from pdpo_jax.rl import PromptBatches, rl_prompts, sample_rollout

    policy = load_model(Path(finished_run["config"].run_dir) / "sft" / "best")
    encoder = PromptEncoder(policy.tokenizer, "chat-en")
    examples = examples_from_dialogues(load_dialogues(DEMO / "dialogues.txt")[:1])[:3]
    prompts, _ = rl_prompts(examples, encoder, room=64)
    batch = PromptBatches(prompts, rows=4, seed=0, shuffle=False, pad_id=pad_id(policy)).batch(0, 0)
    assert batch["prompt_index"].tolist() == [0, 1, 2, -1]  # a filler row fills the short batch
    sampler = Temperature(1.0)
    rollout = sample_rollout(policy, encoder, batch, prompts, max_new_tokens=6, sampler=sampler, seed=5,
                             length_bucket=32)
    sampled = generate(policy, batch["prompt_ids"], batch["segment_ids"], max_new_tokens=6, sampler=sampler, seed=5)
    layout = rollout.batch
    for row, prompt in enumerate(prompts):
        kept, stop = split_at_stop(sampled[row], stop_sequences(policy, encoder))
        scored = np.flatnonzero(layout["loss_mask"][row])
        assert scored[0] == len(prompt.prompt_ids) - 1  # the last prompt token predicts the first response token
        assert layout["targets"][row, scored].tolist() == kept + stop
        assert rollout.responses[row] == decode_response(policy.tokenizer, kept)
        assert rollout.stopped[row] == bool(stop) and rollout.personas[row] == prompt.persona
    assert not layout["loss_mask"][3].any() and rollout.real.tolist() == [True, True, True, False]


KILLER = """
import os, signal, sys
from pdpo_jax import cli, metrics_log
kill_after, write = int(sys.argv[1]), metrics_log.MetricsLog.write
def write_then_die(self, step, split, values):  # killed once a step past the last checkpoint is logged
    write(self, step, split, values)
    if split == "train" and step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
metrics_log.MetricsLog.write = write_then_die
sys.exit(cli.main(["rl", *sys.argv[2:]]))
"""


def saved_state(checkpoints: Path, step: int) -> dict[str, np.ndarray]:
    """Every leaf of a train-state checkpoint (policy, value head, Adam moments, KL coefficient) by path."""
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(checkpoints / str(step) / "state")
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_a_killed_rl_run_rerun_ends_with_the_uninterrupted_parameters(finished_run, subprocess_env):
    straight = Path(finished_run["config"].run_dir)
    resumed = finished_run["tmp"] / "killed"
    resumed.mkdir()
    for stage in ("sft", "nli"):  # the same inputs as the uninterrupted run
        (resumed / stage).symlink_to(straight / stage, target_is_directory=True)
    args = ["--config", *" --config ".join(finished_run["files"]).split(" "), *finished_run["overrides"],
            f"run_dir={resumed}"]
    env = dict(subprocess_env, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    killed = subprocess.run([sys.executable, "-c", KILLER, str(CHECKPOINT_EVERY + 1), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    rl = resumed / "rl"
    assert TrainCheckpointer(rl / "checkpoints").latest_step() == CHECKPOINT_EVERY and not (rl / "DONE").exists()
    assert max(row["step"] for row in lines_of(rl)) == CHECKPOINT_EVERY + 1  # logged past the checkpoint

    assert cli.main(["rl", *args]) == 0  # the same command again
    expected, actual = saved_state(straight / "rl" / "checkpoints", RL_STEPS), saved_state(rl / "checkpoints", RL_STEPS)
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)
    assert lines_of(rl) == lines_of(straight / "rl")
    assert read_best_info(rl / "best") == read_best_info(straight / "rl" / "best")
