"""The layout of a model directory that training writes: an orbax `params/` tree beside the base
model's `config.json`, `generation_config.json` and tokenizer files (never its weights).

`load_model` opens such a directory like a Hugging Face one. The trainer decides when to write one
(`pdpo_jax.train.checkpoints.save_best_params`); this module owns what is in it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from pdpo_jax.model.layer_stack import unstack_layers
from pdpo_jax.object_store import absolute, as_path, is_object_store

PARAMS_DIR = "params"
WEIGHT_SUFFIXES = (".safetensors", ".msgpack", ".bin", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def is_orbax_model_dir(path: str | Path) -> bool:
    """A directory with orbax `params/` beside `config.json`."""
    return (as_path(path) / PARAMS_DIR).is_dir() and (as_path(path) / "config.json").is_file()


def is_weight_file(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json")


def has_tokenizer_files(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in TOKENIZER_FILES)


def write_params(model_dir: str | Path, params: Any) -> None:
    """Saves `params` as `model_dir/params`, in the per-layer layout whatever layout they run in.
    Every process of a multi-host run must call it."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(absolute(model_dir) / PARAMS_DIR, unstack_layers(params))
        checkpointer.wait_until_finished()


def restore_params(model_dir: str | Path, abstract_params: Any) -> Any:
    """Restores `model_dir/params` onto the shapes, dtypes and shardings of `abstract_params`
    (ShapeDtypeStructs with `.sharding`; a different dtype than the saved one is cast on restore)."""
    path = absolute(model_dir) / PARAMS_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no orbax parameter checkpoint here")
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, abstract_params)


def copy_model_files(model_dir: str | Path, out_dir: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Copies `config.json`, `generation_config.json` and tokenizer files (not weights, not `skip`)."""
    model_dir, out_dir = as_path(model_dir), as_path(out_dir)
    for source in model_dir.iterdir():
        if source.is_file() and not is_weight_file(source) and source.name not in skip:
            if is_object_store(source) or is_object_store(out_dir):
                (out_dir / source.name).write_bytes(source.read_bytes())  # one upload, or a local copy
            else:
                shutil.copy2(source, out_dir / source.name)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves with the matching `shardings`: an orbax restore target."""
    return jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), tree, shardings
    )
