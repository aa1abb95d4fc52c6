"""The training loop end to end on a tiny Llama: SFT and DPO learn, best-model selection, the
NaN guard, kill-and-resume in a subprocess, and loading the best model like a Hugging Face dir."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest

from pdpo_jax import parallel
from pdpo_jax.model import load_model
from pdpo_jax.model.decoder import param_shapes
from pdpo_jax import scoring
from pdpo_jax.train import steps
from pdpo_jax.model.model_dir import abstract_like, restore_params
from pdpo_jax.train.checkpoints import TrainCheckpointer, read_best_info, recover_best_dir, save_best_params
from pdpo_jax.train.loop import LoopPlan, TrainingDiverged, run_loop
from pdpo_jax.config import OptimizerConfig
from pdpo_jax.train.optim import make_optimizer
from train_fixtures import (
    FixedEpochBatches,
    dpo_batch,
    micro_batches,
    random_params,
    sft_batch,
    tiny_llama_config,
    with_reference_logps,
    write_model_dir,
)

CONFIG = tiny_llama_config()
REPO_ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"tokens_per_s"}  # wall-clock figures, the only values allowed to differ between runs


def host_copy(tree):
    return jax.tree.map(lambda x: np.array(x), jax.device_get(tree))


def tree_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


def read_metrics(stage_dir: Path, split: str) -> list[dict]:
    lines = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["split"] == split]


class Recorder:
    """Wraps a donating step function and keeps a host copy of the parameters after every step."""

    def __init__(self, step_fn, initial_params):
        self.step_fn = step_fn
        self.params = {0: host_copy(initial_params)}

    def __call__(self, state, batch):
        state, metrics = self.step_fn(state, batch)
        self.params[int(state.step)] = host_copy(state.params)
        return state, metrics


def single_device_abstract(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return abstract_like(tree, jax.tree.map(lambda _: device, tree))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("tiny") / "model", CONFIG)


@pytest.fixture(scope="module")
def sft_setup():
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0,
                                                         weight_decay=0.0), 100)
    objective = partial(steps.sft_objective, config=CONFIG)
    return optimizer, schedule, steps.jit_train_step(objective, optimizer), steps.jit_eval_step(objective)


def sft_plan(stage_dir: Path, model_dir: Path, epochs: int, **overrides) -> LoopPlan:
    fields = dict(stage_dir=stage_dir, epochs=epochs, total_steps=epochs * 8, eval_every=4, checkpoint_every=4,
                  select_metric="loss", select_higher=False, model_dir=model_dir, description="sft-test")
    return LoopPlan(**(fields | overrides))


SFT_TRAIN = [micro_batches(sft_batch(seed=100 + i, rows=8), 2) for i in range(8)]
SFT_VAL = [micro_batches(sft_batch(seed=999, rows=8), 2)]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, model_dir, sft_setup):
    optimizer, schedule, train_step, eval_step = sft_setup
    stage_dir = tmp_path_factory.mktemp("sft") / "sft"
    start = random_params(CONFIG, seed=0)
    recorder = Recorder(train_step, start)
    summary = run_loop(sft_plan(stage_dir, model_dir, epochs=4), steps.create_train_state(jax.device_put(start), optimizer),
                       step_fn=recorder, eval_fn=eval_step, train_batches=FixedEpochBatches(SFT_TRAIN, seed=0),
                       val_batches=SFT_VAL, put_batch=steps.put_micro_batches, schedule=schedule)
    return stage_dir, summary, recorder.params


def test_sft_lowers_validation_loss(sft_run):
    stage_dir, summary, _ = sft_run
    val = read_metrics(stage_dir, "val")
    train = read_metrics(stage_dir, "train")
    assert summary["final_step"] == 32 and [line["step"] for line in train] == list(range(1, 33))
    assert val[0]["step"] == 0 and val[-1]["step"] == 32
    assert val[-1]["loss"] < 0.8 * val[0]["loss"], [line["loss"] for line in val]
    assert all(line["learning_rate"] == pytest.approx(1e-2) for line in train)


def test_best_sft_model_is_the_lowest_validation_loss(sft_run, model_dir):
    stage_dir, summary, params_at = sft_run
    val = read_metrics(stage_dir, "val")
    best = min(val, key=lambda line: line["loss"])  # min keeps the first of equal values, as the loop does
    info = read_best_info(stage_dir / "best")
    assert info["step"] == best["step"] == summary["best_step"] and info["metric"] == "loss"
    assert info["value"] == pytest.approx(best["loss"])
    restored = restore_params(stage_dir / "best", single_device_abstract(param_shapes(CONFIG)))
    assert tree_equal(restored, params_at[best["step"]])
    assert not tree_equal(restored, params_at[0])


def test_best_dir_loads_like_a_hugging_face_dir(sft_run, model_dir):
    stage_dir, summary, params_at = sft_run
    best_dir = stage_dir / "best"
    loaded = load_model(best_dir)
    assert loaded.config == CONFIG
    assert tree_equal(loaded.params, params_at[summary["best_step"]])
    assert loaded.tokenizer is not None and loaded.tokenizer.convert_tokens_to_ids("w5") == 5

    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = load_model(best_dir, mesh=mesh, dtype="bfloat16")
    kernel = sharded.params["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    assert kernel.dtype == np.dtype("bfloat16") and kernel.sharding.spec == parallel.P("fsdp", "tensor")
    expected = params_at[summary["best_step"]]["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), expected.astype("bfloat16"))


def test_best_dir_replaced_whole_and_recovered_after_a_kill_between_renames(tmp_path, model_dir):
    best_dir = tmp_path / "stage" / "best"
    first, second = random_params(CONFIG, seed=5), random_params(CONFIG, seed=6)
    save_best_params(best_dir, first, model_dir, {"step": 1})
    save_best_params(best_dir, second, model_dir, {"step": 2})
    assert sorted(p.name for p in best_dir.parent.iterdir()) == ["best"]
    assert read_best_info(best_dir) == {"step": 2} and (best_dir / "tokenizer.json").is_file()
    abstract = single_device_abstract(param_shapes(CONFIG))
    assert tree_equal(restore_params(best_dir, abstract), second)
    best_dir.rename(best_dir.with_name("best.old"))  # killed after moving the old one aside
    recover_best_dir(best_dir)
    assert read_best_info(best_dir) == {"step": 2} and tree_equal(restore_params(best_dir, abstract), second)


class PoisonedBatches(FixedEpochBatches):
    """Batch `poison_index` of epoch 0 has a NaN in its loss mask (a corrupt record); batch
    `empty_index` scores no token at all (legitimate, if useless: loss 0/0, no divergence)."""

    def __init__(self, stacks, poison_index: int, empty_index: int):
        super().__init__(stacks, seed=0)
        self.poison_index, self.empty_index = poison_index, empty_index

    def batch(self, epoch, index):
        batch = super().batch(epoch, index)
        if (epoch, index) == (0, self.poison_index):
            batch = dict(batch, loss_mask=batch["loss_mask"].copy())
            batch["loss_mask"][0, 0, -1] = np.nan
        if (epoch, index) == (0, self.empty_index):
            batch = dict(batch, loss_mask=np.zeros_like(batch["loss_mask"]))
        return batch


def test_nan_guard_stops_with_the_last_good_checkpoint_intact(tmp_path, model_dir, sft_setup):
    optimizer, _, train_step, eval_step = sft_setup
    stage_dir = tmp_path / "sft"
    start = random_params(CONFIG, seed=1)
    recorder = Recorder(train_step, start)
    plan = sft_plan(stage_dir, model_dir, epochs=1, checkpoint_every=1)
    with pytest.raises(TrainingDiverged) as caught:
        run_loop(plan, steps.create_train_state(jax.device_put(start), optimizer), step_fn=recorder, eval_fn=eval_step,
                 train_batches=PoisonedBatches(SFT_TRAIN, poison_index=3, empty_index=1), val_batches=SFT_VAL,
                 put_batch=steps.put_micro_batches)
    message = str(caught.value)
    assert "step 4 " in message and "checkpoint is step 3" in message and str(stage_dir / "checkpoints") in message
    train_lines = read_metrics(stage_dir, "train")
    assert [line["step"] for line in train_lines] == [1, 2, 3]  # nothing of step 4
    assert train_lines[1]["loss"] is None and train_lines[1]["grad_norm"] == 0.0  # the empty batch

    shapes = jax.eval_shape(partial(steps.create_train_state, optimizer=optimizer), param_shapes(CONFIG))
    checkpointer = TrainCheckpointer(stage_dir / "checkpoints")
    assert checkpointer.latest_step() == 3
    restored, meta = checkpointer.restore(single_device_abstract(shapes))
    checkpointer.close()
    assert int(restored.step) == 3 and (meta["epoch"], meta["index"]) == (0, 3)
    assert tree_equal(restored.params, recorder.params[3])
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(restored))


def test_dpo_raises_validation_reward_accuracy(tmp_path, model_dir):
    """Chosen responses follow the prompt's pattern, rejected ones are random (a stand-in for
    responses to a shuffled persona); the reference is the frozen starting model."""
    start = jax.device_put(random_params(CONFIG, seed=2))
    scorer = jax.jit(scoring.sequence_scores, static_argnums=(1, 3))
    reference = lambda batch: scorer(start, CONFIG, batch, batch["input_ids"].shape[0])[0]
    train = [micro_batches(with_reference_logps(dpo_batch(seed=200 + i, pairs=8), reference), 2) for i in range(6)]
    val = [micro_batches(with_reference_logps(dpo_batch(seed=300, pairs=16), reference), 2)]
    optimizer, _ = make_optimizer(OptimizerConfig(learning_rate=3e-3, schedule="constant", warmup_ratio=0.0), 100)
    objective = partial(steps.dpo_objective, config=CONFIG, settings=steps.DPOSettings(beta=0.5))
    recorder = Recorder(steps.jit_train_step(objective, optimizer), start)
    plan = LoopPlan(stage_dir=tmp_path / "dpo", epochs=4, total_steps=24, eval_every=3, checkpoint_every=12,
                    select_metric="rewards/accuracies", select_higher=True, model_dir=model_dir, description="dpo-test")
    summary = run_loop(plan, steps.create_train_state(jax.device_put(host_copy(start)), optimizer), step_fn=recorder,
                       eval_fn=steps.jit_eval_step(objective), train_batches=FixedEpochBatches(train, seed=0),
                       val_batches=val, put_batch=steps.put_micro_batches)
    val_lines = read_metrics(plan.stage_dir, "val")
    assert val_lines[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-5)  # policy == reference at step 0
    assert val_lines[-1]["rewards/accuracies"] > 0.5 and val_lines[-1]["rewards/margins"] > 0
    best = max(val_lines, key=lambda line: line["rewards/accuracies"])  # first of equal values, as the loop
    info = read_best_info(plan.stage_dir / "best")
    assert info["step"] == best["step"] == summary["best_step"] and info["metric"] == "rewards/accuracies"
    restored = restore_params(plan.stage_dir / "best", single_device_abstract(param_shapes(CONFIG)))
    assert tree_equal(restored, recorder.params[best["step"]])


def run_resume_script(out_dir: Path, cache_dir: Path, base_env: dict[str, str],
                      kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = dict(base_env, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),  # later runs skip compiling
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("PDPO_KILL_AFTER_STEP", None)
    if kill_after is not None:
        env["PDPO_KILL_AFTER_STEP"] = str(kill_after)
    command = [sys.executable, str(REPO_ROOT / "tests" / "train_resume_script.py"), str(out_dir)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def comparable_lines(stage_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def test_killed_run_resumes_to_the_same_result(tmp_path, subprocess_env):
    cache = tmp_path / "jax_cache"
    straight = run_resume_script(tmp_path / "straight", cache, subprocess_env)
    assert straight.returncode == 0, straight.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    killed = run_resume_script(interrupted, cache, subprocess_env, kill_after=5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert TrainCheckpointer(interrupted / "sft" / "checkpoints").latest_step() == 4
    assert max(line["step"] for line in comparable_lines(interrupted / "sft")) == 5  # logged past the checkpoint
    assert not (interrupted / "final_params.npz").exists()

    resumed = run_resume_script(interrupted, cache, subprocess_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, actual = np.load(tmp_path / "straight" / "final_params.npz"), np.load(interrupted / "final_params.npz")
    assert sorted(expected.files) == sorted(actual.files)
    for name in expected.files:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    assert comparable_lines(interrupted / "sft") == comparable_lines(tmp_path / "straight" / "sft")
    assert read_best_info(interrupted / "sft" / "best") == read_best_info(tmp_path / "straight" / "sft" / "best")
