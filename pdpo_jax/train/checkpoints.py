"""Orbax checkpoints: the latest train state for exact resumption, and the best parameters.

`stage_dir/checkpoints/<step>/` holds `state` (step, params, optimizer state) and `meta` (data
position, best-so-far, RNG seed) written together by one CheckpointManager, so a kill at any moment
leaves either the previous complete checkpoint or the new one, never a mix. `stage_dir/best/`
holds the best parameters as a plain orbax tree beside the model's `config.json` and tokenizer
files (the layout of `pdpo_jax.model.model_dir`), so `load_model(stage_dir / "best")` opens it
like a Hugging Face directory.

On gs:// orbax commits each checkpoint with a `commit_success.txt` marker instead of a rename (and
ignores a step without one), and `best/` is published by `storage.commit_directory`, whose
`COMMITTED` marker is written last.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from pdpo_jax.model.model_dir import copy_model_files, write_params
from pdpo_jax.object_store import absolute, as_path
from pdpo_jax.storage import atomic_write_json, commit_directory, recover_directory

BEST_INFO = "best.json"


class TrainCheckpointer:
    """Keeps the latest `keep` train-state checkpoints of one stage."""

    def __init__(self, directory: str | Path, keep: int = 1):
        self.directory = absolute(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )
        self._manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with `.sharding`),
        which may describe a different mesh than the one the checkpoint was written from."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no train checkpoint to restore")
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        )
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        self._manager.close()


def save_best_params(best_dir: str | Path, params: Any, model_dir: str | Path, info: dict[str, Any]) -> None:
    """Writes the best parameters next to the base model's config and tokenizer files.

    Built beside `best/` and swapped in whole (`pdpo_jax.storage.commit_directory`), so `best/` is
    always one complete model. Every process takes part in the orbax save; the first one alone
    touches files.
    """
    best_dir = absolute(best_dir)
    primary = jax.process_index() == 0
    with commit_directory(best_dir, tag="all-processes", commit=primary) as building:
        _sync("pdpo_best_params_start")
        write_params(building, params)
        if primary:
            copy_model_files(model_dir, building, skip=(BEST_INFO,))
            atomic_write_json(building / BEST_INFO, info)
    _sync("pdpo_best_params_done")


def recover_best_dir(best_dir: str | Path) -> None:
    """Puts the previous `best/` back when a save was killed between its two renames."""
    recover_directory(absolute(best_dir))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_best_info(model_dir: str | Path) -> dict[str, Any]:
    path = as_path(model_dir) / BEST_INFO
    return json.loads(path.read_text()) if path.exists() else {}
