"""What SFT, DPO and the NLI classifier share once their batches exist: optimizer, sharded train
state, jitted steps, and the loop with best-model selection. (PPO, whose steps are rollouts, sets
up the same pieces itself: `pdpo_jax.rl.ppo.fit_ppo`.)"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import jax
from jax.sharding import Mesh

from pdpo_jax.config import TrainingSection
from pdpo_jax.train.batches import StepBatches
from pdpo_jax.train.loop import LoopPlan, run_loop, total_steps
from pdpo_jax.train.optim import make_optimizer
from pdpo_jax.train.steps import create_train_state, jit_eval_step, jit_train_step, put_micro_batches, state_shardings


def fit(*, model: Any, objective: Callable, section: TrainingSection, train: StepBatches, val: StepBatches, out_dir: Path,
        mesh: Mesh, seed: int, select_metric: str, select_higher: bool, description: str) -> dict[str, Any]:
    """Trains `model.params` with `objective` under a training stage's `section` (its optimizer,
    epochs, max_steps, eval_every, checkpoint_every) and returns the loop's summary (without the
    final state)."""
    steps = total_steps(section.epochs, train.steps_per_epoch(), section.max_steps)
    optimizer, schedule = make_optimizer(section.optimizer, steps)
    shardings = state_shardings(model.params, optimizer, mesh)
    state = jax.jit(functools.partial(create_train_state, optimizer=optimizer), out_shardings=shardings)(model.params)
    plan = LoopPlan(
        stage_dir=out_dir, epochs=section.epochs, total_steps=steps, eval_every=section.eval_every,
        checkpoint_every=section.checkpoint_every, select_metric=select_metric, select_higher=select_higher,
        model_dir=Path(model.path), description=description,
    )
    result = run_loop(
        plan, state, step_fn=jit_train_step(objective, optimizer, mesh, shardings),
        eval_fn=jit_eval_step(objective, mesh, shardings.params), train_batches=train,
        val_batches=val.all_batches(), put_batch=functools.partial(put_micro_batches, mesh=mesh),
        state_shardings=shardings, schedule=schedule, seed=seed,
    )
    return {key: value for key, value in result.items() if key != "state"}
