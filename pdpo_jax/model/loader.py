"""load_model: config, parameters and tokenizer of one model directory in one call.

A model directory is a Hugging Face one (config.json + weights) or a trained stage's `best/`
(config.json + an orbax `params/` tree, see pdpo_jax.train.checkpoints); both open the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdpo_jax.model.checkpoint import load_hf, read_config
from pdpo_jax.model.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass
class LoadedModel:
    config: ModelConfig
    params: Any
    tokenizer: Any
    path: Path


def has_tokenizer_files(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in TOKENIZER_FILES)


def load_model(path: str | os.PathLike, *, dtype: Any = None, mesh: Any = None, allow_pickle: bool = False) -> LoadedModel:
    """`path` is a Hugging Face model directory, or "default" for the bundled model."""
    if os.fspath(path) == "default":
        from pdpo_jax.model.default_model import default_model_dir

        path = default_model_dir()
    model_dir = Path(path)
    if is_orbax_model_dir(model_dir):
        config, params = _load_orbax(model_dir, dtype=dtype, mesh=mesh)
    else:
        config, params = load_hf(model_dir, dtype=dtype, shardings=mesh, allow_pickle=allow_pickle)
    tokenizer = None
    if has_tokenizer_files(model_dir):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.fspath(model_dir))
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, path=model_dir)


def is_orbax_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "params").is_dir() and (Path(path) / "config.json").is_file()


def _load_orbax(model_dir: Path, *, dtype: Any, mesh: Any) -> tuple[ModelConfig, Any]:
    """Restores `model_dir/params` onto one device, or onto `mesh` by the partition rules."""
    import jax
    import jax.numpy as jnp

    from pdpo_jax.model.decoder import param_shapes
    from pdpo_jax.train.checkpoints import restore_params

    config = read_config(model_dir)
    shapes = param_shapes(config)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, shapes)
    else:
        from pdpo_jax.parallel import param_shardings

        shardings = param_shardings(shapes, mesh)
    target = jnp.dtype(dtype or "float32")
    abstract = jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, target, sharding=sharding), shapes, shardings
    )
    return config, restore_params(model_dir, abstract)
