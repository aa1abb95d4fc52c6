"""load_model: config, parameters and tokenizer of one model directory in one call.

A directory is either a Hugging Face model (safetensors / msgpack / pickle weights) or one written
by training (`pdpo_jax.train.checkpoints.save_best_params`: orbax `params/` beside the same
`config.json` and tokenizer files); both load the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from flax import traverse_util

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


def load_orbax_params(model_dir: Path, *, dtype: Any = None, shardings: Any = None) -> tuple[ModelConfig, Any]:
    """(ModelConfig, params) from a `save_best_params` directory, restored straight onto `shardings`
    (None: the default device; a Mesh: the partition rules; or {"a/b/kernel": Sharding}) in `dtype`."""
    from pdpo_jax.model.decoder import param_shapes
    from pdpo_jax.parallel import param_shardings
    from pdpo_jax.train.checkpoints import restore_params

    config = read_config(model_dir)
    shapes = param_shapes(config)
    if shardings is None:
        placement = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), shapes)
    elif isinstance(shardings, jax.sharding.Mesh):
        placement = param_shardings(shapes, shardings)
    else:
        flat = traverse_util.flatten_dict(shapes, sep="/")
        missing = sorted(set(flat) - set(shardings))
        if missing:
            raise ValueError(f"no sharding given for parameter {missing[0]!r} of {model_dir}")
        placement = traverse_util.unflatten_dict({path: shardings[path] for path in flat}, sep="/")
    target_dtype = jax.numpy.dtype(dtype or "float32")
    abstract = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, target_dtype, sharding=sharding),
                            shapes, placement)
    return config, restore_params(model_dir, abstract)


def load_model(path: str | os.PathLike, *, dtype: Any = None, mesh: Any = None, allow_pickle: bool = False) -> LoadedModel:
    """`path` is a Hugging Face model directory, a directory written by `save_best_params`, or
    "default" for the bundled model. `dtype` is the parameter dtype (default float32); `mesh` is
    None, a Mesh, or a {"a/b/kernel": Sharding} mapping."""
    from pdpo_jax.train.checkpoints import is_orbax_model_dir

    if os.fspath(path) == "default":
        from pdpo_jax.model.default_model import default_model_dir

        path = default_model_dir()
    model_dir = Path(path)
    if is_orbax_model_dir(model_dir):
        config, params = load_orbax_params(model_dir, dtype=dtype, shardings=mesh)
    else:
        config, params = load_hf(model_dir, dtype=dtype, shardings=mesh, allow_pickle=allow_pickle)
    tokenizer = None
    if has_tokenizer_files(model_dir):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.fspath(model_dir))
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, path=model_dir)

