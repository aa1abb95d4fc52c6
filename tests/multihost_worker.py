"""One process of the two-process SFT run in test_multihost.py (run as a script, not collected).

The parent sets JAX_PLATFORMS=cpu, two fake CPU devices per process, and the standard
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables with PDPO_DISTRIBUTED=1,
so `initialize_distributed()` joins the processes exactly as on a pod. Every process feeds only
its own rows of each global batch, trains a few steps, saves an orbax checkpoint to a shared
folder, restores it onto the training mesh and onto a different one, and writes what it saw to
`<out>/process_<i>.npz` for the parent to compare against a single-process run.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

# These imports must not touch the XLA backend before initialize_distributed() runs.
import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from pdpo_jax import parallel
from pdpo_jax.train.checkpoints import TrainCheckpointer
from pdpo_jax.config import OptimizerConfig
from pdpo_jax.train.optim import make_optimizer
from pdpo_jax.train.steps import create_train_state, jit_train_step, sft_objective, state_shardings

TRAIN_MESH = dict(data=1, fsdp=2, tensor=2)  # parameters split across both processes (fsdp)
RESTORE_MESH = dict(data=2, fsdp=1, tensor=2)  # parameters replicated across processes


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, type=Path, help="tiny Hugging Face model directory")
    parser.add_argument("--batches", required=True, type=Path, help=".npz of global batches [steps, 1, B, T]")
    parser.add_argument("--checkpoints", required=True, type=Path, help="checkpoint folder shared by all processes")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--adam-eps", type=float, required=True)
    return parser.parse_args(argv)


def flat_numpy(tree) -> dict[str, np.ndarray]:
    """Every leaf gathered from all processes, keyed by its '/'-joined path."""
    gathered = multihost_utils.process_allgather(tree, tiled=True)
    return {path: np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(gathered, sep="/").items()}


def abstract_state(state_shape, shardings):
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        state_shape, shardings)


def progress(message: str) -> None:
    """The parent treats a worker that stays silent too long as hung."""
    print(f"[process {jax.process_index()}] {message}", flush=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    assert parallel.initialize_distributed(), "the environment should ask for a distributed run"
    progress("joined")
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2, (
        jax.process_count(), jax.device_count(), jax.local_device_count())
    from pdpo_jax.model import load_hf  # after initialization: loading places arrays on devices

    batches = dict(np.load(args.batches))
    steps, _, global_rows, _ = batches["input_ids"].shape
    mesh = parallel.make_mesh(**TRAIN_MESH)
    config, params = load_hf(args.model, shardings=mesh)
    optimizer, _ = make_optimizer(OptimizerConfig(learning_rate=args.learning_rate, eps=args.adam_eps, schedule="constant",
                                                  warmup_ratio=0.0), total_steps=steps)
    shardings = state_shardings(params, optimizer, mesh)
    state = jax.jit(partial(create_train_state, optimizer=optimizer), out_shardings=shardings)(params)
    step = jit_train_step(partial(sft_objective, config=config), optimizer, mesh, shardings)
    progress("model loaded and sharded")

    rows = parallel.process_batch_indices(mesh, global_rows, batch_axis=1)
    losses = []
    for k in range(steps):
        local = {key: value[k][:, rows] for key, value in batches.items()}
        global_batch = parallel.place_batch(local, mesh, batch_axis=1, rows="local")
        assert global_batch["input_ids"].shape == batches["input_ids"][k].shape
        state, metrics = step(state, global_batch)
        total, count = metrics["loss"]
        losses.append(float(total) / float(count))
        progress(f"step {k + 1}: loss {losses[-1]:.4f}")

    checkpointer = TrainCheckpointer(args.checkpoints)
    checkpointer.save(steps, state, {"step": steps, "losses": losses})
    progress("checkpoint saved")
    final = flat_numpy(state.params)

    restored, meta = checkpointer.restore(abstract_state(state, shardings))
    same_mesh = flat_numpy(restored.params)
    restored_step = int(multihost_utils.process_allgather(restored.step, tiled=True))
    progress("restored onto the training mesh")

    other_mesh = parallel.make_mesh(**RESTORE_MESH)
    other_shardings = state_shardings(params, optimizer, other_mesh)
    moved, _ = checkpointer.restore(abstract_state(state, other_shardings))
    moved_leaf = jax.tree.leaves(moved.params)[0]
    assert moved_leaf.sharding.mesh.shape == other_mesh.shape
    other = flat_numpy(moved.params)
    checkpointer.close()

    out = {f"final/{k}": v for k, v in final.items()}
    out |= {f"restored/{k}": v for k, v in same_mesh.items()}
    out |= {f"other_mesh/{k}": v for k, v in other.items()}
    out |= {"losses": np.asarray(losses), "rows": rows, "restored_step": np.asarray(restored_step),
            "meta_step": np.asarray(meta["step"])}
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / f"process_{jax.process_index()}.npz", **out)
    progress("done")
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
