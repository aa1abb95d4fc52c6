"""The training loop shared by SFT, DPO, the NLI classifier and PPO: epochs, periodic validation,
best-model selection, metrics logs, progress bar, NaN guard, and orbax checkpoints that resume
exactly. A step is whatever `step_fn` does with one batch: an optimizer update, or a PPO rollout
and its updates.

Resumption is exact because everything a step depends on is either in the checkpoint (parameters,
optimizer state with its step count, best-so-far) or a pure function of (seed, epoch, batch index)
(the data order). Metrics lines written after the last checkpoint are dropped on resume, so the
log of a resumed run equals that of an uninterrupted one.

Preemption: SIGTERM (what a preemptible or spot TPU VM receives before it is taken away) does not
stop a step halfway. The loop finishes the step it is in, saves a checkpoint at that step boundary
and raises `Preempted`, which `pdpo` turns into exit status RESUME_EXIT_STATUS (75): "stopped
cleanly, run the same command again to continue" (tpu/launch.sh documents it). On several hosts
the loop stops at the first boundary after any host got the signal, all hosts at the same step.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import numpy as np
from tqdm.auto import tqdm

from pdpo_jax.errors import RunFailed
from pdpo_jax.metrics_log import MetricsLog, json_float
from pdpo_jax.model.model_dir import abstract_like
from pdpo_jax.objectives import Metrics, finalize_metrics, merge_metrics
from pdpo_jax.train.checkpoints import TrainCheckpointer, recover_best_dir, save_best_params


class TrainingDiverged(RunFailed):
    """A non-finite loss; the last good checkpoint on disk is untouched."""


RESUME_EXIT_STATUS = 75  # EX_TEMPFAIL: stopped on SIGTERM after a checkpoint; rerun to continue


class Preempted(RunFailed):
    """SIGTERM arrived; the step in progress was finished and checkpointed. Rerun to continue."""

    exit_status = RESUME_EXIT_STATUS


class _TerminationRequest:
    """Records SIGTERM while installed (main thread only) instead of dying mid-step."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None

    def __enter__(self) -> "_TerminationRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def on_any_host(self) -> bool:
        if jax.process_count() == 1:
            return self.received
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self.received))))


class EpochBatches(Protocol):
    """Deterministic batches: the same (epoch, index) always gives the same micro-batch stack."""

    def steps_per_epoch(self) -> int: ...

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class LoopPlan:
    stage_dir: Path
    epochs: int
    total_steps: int
    eval_every: int
    checkpoint_every: int
    select_metric: str  # validation metric that picks the best model
    select_higher: bool  # True: higher is better (DPO reward accuracy); False: lower (SFT loss)
    model_dir: Path  # config and tokenizer files copied next to the best parameters
    description: str = "train"


def total_steps(epochs: int, steps_per_epoch: int, max_steps: int | None) -> int:
    steps = epochs * steps_per_epoch
    return min(steps, max_steps) if max_steps else steps


def evaluate(eval_fn: Callable[[Any, Any], Metrics], params: Any, batches: list[Any],
             put_batch: Callable[[Any], Any] = lambda batch: batch) -> dict[str, float]:
    total: Metrics = {}
    for batch in batches:
        total = merge_metrics(total, jax.device_get(eval_fn(params, put_batch(batch))))
    return finalize_metrics(total)


def divergence_message(step: int, epoch: int, index: int, values: dict[str, float], checkpointer: TrainCheckpointer) -> str:
    last = checkpointer.latest_step()
    where = (f"the last good checkpoint is step {last} in {checkpointer.directory}" if last is not None
             else f"no checkpoint had been written yet in {checkpointer.directory}")
    return (f"non-finite training step {step} (epoch {epoch}, batch {index}): loss={values['loss']}, "
            f"grad_norm={values.get('grad_norm')}; stopped without saving it; {where}.")


def run_loop(plan: LoopPlan, state: Any, *, step_fn: Callable, eval_fn: Callable, train_batches: EpochBatches,
             val_batches: list[Any], put_batch: Callable[[dict[str, np.ndarray]], Any],
             state_shardings: Any = None, schedule: Callable[[int], Any] | None = None,
             seed: int = 0) -> dict[str, Any]:
    """Runs (or resumes) training to `plan.total_steps`; returns a summary with the best step.

    `state` is the starting train state; when `plan.stage_dir/checkpoints` holds a checkpoint it
    only serves as the restore target (its shapes, and `state_shardings` or its own shardings).
    `step_fn(state, batch) -> (state, metrics)` may donate its state. `schedule(step)` adds the
    learning rate of each update to the train metrics. Raises TrainingDiverged at the first step
    whose loss or gradient norm is not finite, before anything of that step is written.
    """
    stage_dir = plan.stage_dir
    stage_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = TrainCheckpointer(stage_dir / "checkpoints")
    meta = {"epoch": 0, "index": 0, "best_value": None, "best_step": None, "seed": seed}
    resume_step = -1  # a fresh start keeps no line of an earlier, unfinished attempt
    if checkpointer.latest_step() is not None:
        shardings = state_shardings or jax.tree_util.tree_map(lambda x: x.sharding, state)
        state, meta = checkpointer.restore(abstract_like(state, shardings))
        resume_step = int(jax.device_get(state.step))
    step = int(jax.device_get(state.step))
    primary = jax.process_index() == 0
    if primary:
        recover_best_dir(stage_dir / "best")
    log = MetricsLog(stage_dir, resume_step=resume_step, enabled=primary)
    steps_per_epoch = train_batches.steps_per_epoch()
    better = (lambda new, old: new > old) if plan.select_higher else (lambda new, old: new < old)

    def validate_and_select() -> None:
        values = evaluate(eval_fn, state.params, val_batches, put_batch)
        if plan.select_metric not in values:
            raise KeyError(f"validation metrics {sorted(values)} lack the selection metric {plan.select_metric!r}")
        log.write(step, "val", values)
        value = values[plan.select_metric]
        if math.isfinite(value) and (meta["best_value"] is None or better(value, meta["best_value"])):
            meta.update(best_value=value, best_step=step)
            save_best_params(stage_dir / "best", state.params, plan.model_dir,
                             {"step": step, "metric": plan.select_metric, "value": value,
                              "val": {k: json_float(v) for k, v in values.items()}})
        best = "none yet" if meta["best_value"] is None else f"{meta['best_value']:.4f} at step {meta['best_step']}"
        if primary:
            bar.write(f"[{plan.description}] step {step} val {plan.select_metric}={value:.4f} (best {best})")

    bar = tqdm(total=plan.total_steps, initial=step, desc=plan.description, dynamic_ncols=True, disable=not primary)
    termination = _TerminationRequest().__enter__()
    try:
        if step == 0 and meta["best_step"] is None:
            validate_and_select()  # the starting model is a candidate too
        epoch, index = meta["epoch"], meta["index"]
        while step < plan.total_steps and epoch < plan.epochs:
            host_batch = train_batches.batch(epoch, index)
            tokens = int((host_batch["segment_ids"] > 0).sum())
            started = time.perf_counter()
            state, metrics = step_fn(state, put_batch(host_batch))
            metrics = jax.device_get(metrics)
            values = finalize_metrics(metrics)
            elapsed = time.perf_counter() - started
            # The sums, not the means: a batch with nothing to score has loss 0/0 and is no divergence.
            if not all(math.isfinite(float(metrics[name][0])) for name in ("loss", "grad_norm") if name in metrics):
                raise TrainingDiverged(divergence_message(step + 1, epoch, index, values, checkpointer))
            if schedule is not None:
                values["learning_rate"] = float(schedule(step))
            step += 1
            index += 1
            if index == steps_per_epoch:
                epoch, index = epoch + 1, 0
            values["tokens_per_s"] = tokens / elapsed
            log.write(step, "train", values)
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}")
            finished = step >= plan.total_steps or epoch >= plan.epochs
            if step % plan.eval_every == 0 or index == 0 or finished:
                validate_and_select()
            stop = not finished and termination.on_any_host()
            if step % plan.checkpoint_every == 0 or index == 0 or finished or stop:
                meta.update(epoch=epoch, index=index)
                checkpointer.save(step, state, meta)
                log.flush()
            if stop:
                raise Preempted(f"{plan.description}: stopped on SIGTERM after step {step} of {plan.total_steps}, "
                                f"saved in {checkpointer.directory}; run the same command again to continue")
    finally:
        termination.__exit__()
        bar.close()
        log.close()
        checkpointer.close()
    return {"final_step": step, "best_step": meta["best_step"], "best_value": meta["best_value"],
            "select_metric": plan.select_metric, "state": state}
