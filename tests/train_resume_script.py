"""Trains a tiny Llama with SFT through `run_loop`, checkpointing every other step, for the
kill-and-resume test: `python tests/train_resume_script.py OUT_DIR`.

With PDPO_KILL_AFTER_STEP=k in the environment the process SIGKILLs itself right after step k's
logs (and checkpoint, if one is due), just as the next step starts, so nothing gets a chance to
clean up. Run the same command again (without the variable) and it resumes from the last
checkpoint. The final parameters are written to OUT_DIR/final_params.npz.

PDPO_TERM_AFTER_STEP=k sends SIGTERM instead (a preempted VM): the loop checkpoints at the next step
boundary and the script exits with the loop's resume status. OUT_DIR may be gs://bucket/...; the
model's files then go to PDPO_MODEL_DIR (a local folder).

Runs on a 2-device mesh (fsdp=2), so the checkpoints hold sharded parameters and optimizer state.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from functools import partial
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_fixtures, when run as a module

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from pdpo_jax import parallel  # noqa: E402
from pdpo_jax.object_store import as_path  # noqa: E402
from pdpo_jax.storage import atomic_write_bytes  # noqa: E402
from pdpo_jax.model.decoder import param_shapes  # noqa: E402
from pdpo_jax.train import steps  # noqa: E402
from pdpo_jax.train.loop import LoopPlan, Preempted, run_loop  # noqa: E402
from pdpo_jax.config import OptimizerConfig  # noqa: E402
from pdpo_jax.train.optim import make_optimizer  # noqa: E402
from train_fixtures import FixedEpochBatches, micro_batches, random_params, sft_batch, tiny_llama_config, write_model_dir  # noqa: E402

EPOCHS = 2
STACKS = 4  # steps per epoch


def main(out_dir: Path) -> None:
    config = tiny_llama_config()
    model_dir = write_model_dir(Path(os.environ.get("PDPO_MODEL_DIR") or out_dir / "model"), config)
    total = EPOCHS * STACKS
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=3e-3, schedule="cosine", warmup_ratio=0.2), total)
    mesh = parallel.make_mesh(data=1, fsdp=2, devices=jax.devices()[:2])
    shardings = steps.state_shardings(param_shapes(config), optimizer, mesh)
    state = jax.device_put(steps.create_train_state(random_params(config, seed=0), optimizer), shardings)
    objective = partial(steps.sft_objective, config=config)
    train_step = steps.jit_train_step(objective, optimizer, mesh, shardings)
    kill_after = int(os.environ.get("PDPO_KILL_AFTER_STEP", "-1"))
    term_after = int(os.environ.get("PDPO_TERM_AFTER_STEP", "-1"))

    def step_fn(state, batch):
        if int(jax.device_get(state.step)) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if int(jax.device_get(state.step)) == term_after:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step still completes
        return train_step(state, batch)

    plan = LoopPlan(stage_dir=out_dir / "sft", epochs=EPOCHS, total_steps=total, eval_every=1, checkpoint_every=2,
                    select_metric="loss", select_higher=False, model_dir=model_dir, description="resume-test")
    train = FixedEpochBatches([micro_batches(sft_batch(seed=10 + i, rows=4), 2) for i in range(STACKS)], seed=1)
    summary = run_loop(plan, state, step_fn=step_fn, eval_fn=steps.jit_eval_step(objective, mesh, shardings.params),
                       train_batches=train, val_batches=[micro_batches(sft_batch(seed=99, rows=4), 1)],
                       put_batch=partial(steps.put_micro_batches, mesh=mesh), state_shardings=shardings,
                       schedule=schedule)
    flat = traverse_util.flatten_dict(jax.device_get(summary["state"].params), sep="/")
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    atomic_write_bytes(out_dir / "final_params.npz", buffer.getvalue())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    try:
        main(as_path(sys.argv[1]))
    except Preempted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_status)
