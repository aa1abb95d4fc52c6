"""`load_model`: config, parameters and tokenizer of one model directory in one call.

A directory is either a Hugging Face model (safetensors / msgpack / pickle weights) or one written
by training (`pdpo_jax.model.model_dir`: orbax `params/` beside the same `config.json` and
tokenizer files); both load the same way. `default` names the bundled model.

A directory on Cloud Storage (`gs://bucket/models/x`, or a run's `gs://.../sft/best`) is copied
to this host's cache (`<cache>/gcs/<bucket>/<path>`, each file verified by size and checksum, only
changed files fetched again) and loaded from there by the same memory-mapped path as a local one.
A folder our runs write is read only once its COMMITTED marker is there (`storage.is_committed`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jax
from flax import traverse_util

from pdpo_jax.errors import ModelDirError
from pdpo_jax.model.checkpoint import expected_shapes, load_hf, read_config
from pdpo_jax.model.config import ModelConfig
from pdpo_jax.model.decoder import param_shapes
from pdpo_jax.model.default_model import default_model_dir
from pdpo_jax.model.hub import hub_model_dir, looks_like_hub_id
from pdpo_jax.model.layer_stack import in_layout
from pdpo_jax.model.model_dir import has_tokenizer_files, is_orbax_model_dir, restore_params
from pdpo_jax.object_store import default_gcs_cache, is_object_store, local_copy
from pdpo_jax.storage import BUILDING_INFIX, COMMIT_MARKER, is_committed
from pdpo_jax.parallel import param_shardings

ComputeDtype = Literal["float32", "bfloat16"]


@dataclass
class Model:
    """A loaded model: `config` (with the compute dtype and remat it runs with), `params` (a Flax
    parameter tree), `tokenizer` (transformers, or None when the directory has none), `path`."""

    config: ModelConfig
    params: Any
    tokenizer: Any
    path: Path


def eos_ids(model: Model) -> tuple[int, ...]:
    """Every id that ends a sequence: the config's end-of-sequence id(s) and the tokenizer's."""
    ids = model.config.eos_token_id
    ids = (ids,) if isinstance(ids, int) else tuple(ids or ())
    tokenizer_eos = getattr(model.tokenizer, "eos_token_id", None)
    if tokenizer_eos is not None:
        ids += (int(tokenizer_eos),)
    ids = tuple(dict.fromkeys(int(i) for i in ids))
    if not ids:
        raise ModelDirError(f"{model.path}: the model has no end-of-sequence token id to stop on")
    return ids


def pad_id(model: Model) -> int:
    """The id that fills padding: the tokenizer's pad, else the config's, else the first EOS id."""
    tokenizer_pad = getattr(model.tokenizer, "pad_token_id", None)
    if tokenizer_pad is not None:
        return int(tokenizer_pad)
    if model.config.pad_token_id is not None:
        return int(model.config.pad_token_id)
    return eos_ids(model)[0]


def require_tokenizer(model: Model) -> Any:
    if model.tokenizer is None:
        raise ModelDirError(f"{model.path}: no tokenizer files next to the model; turning text into tokens needs one")
    return model.tokenizer


def load_orbax_params(model_dir: Path, *, dtype: Any = None, shardings: Any = None,
                      num_labels: int | None = None) -> tuple[ModelConfig, Any]:
    """(ModelConfig, params) from a training-written directory, restored straight onto `shardings`
    (None: the default device; a Mesh: the partition rules; or {"a/b/kernel": Sharding}) in `dtype`.
    With `num_labels`, the parameters of a sequence classifier on that config's trunk."""
    config = read_config(model_dir)
    if num_labels is None:
        shapes = param_shapes(config)
    else:
        flat_shapes = expected_shapes(config, num_labels)
        shapes = traverse_util.unflatten_dict(
            {path: jax.ShapeDtypeStruct(shape, jax.numpy.float32) for path, shape in flat_shapes.items()}, sep="/")
    if shardings is None:
        placement = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), shapes)
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


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The directory `path` names: a folder, "default" (the bundled model, materialized on first
    use) or a Hugging Face Hub id such as "meta-llama/Llama-2-13b-hf" (fetched into the Hub cache)."""
    if os.fspath(path) == "default":
        return default_model_dir()
    if is_object_store(path):
        return local_model_copy(path)
    if looks_like_hub_id(os.fspath(path)):
        return hub_model_dir(os.fspath(path))
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: model directory not found")
    if not (model_dir / "config.json").is_file():
        raise ModelDirError(f"{model_dir}: no config.json (is this a model directory?)")
    return model_dir


def local_model_copy(url: str | os.PathLike) -> Path:
    """This host's verified copy of a gs:// model directory (see the module's docstring)."""
    from etils import epath

    folder = epath.Path(os.fspath(url))
    if not is_committed(folder) and (any(folder.parent.glob(f"{folder.name}{BUILDING_INFIX}*"))
                                     or not (folder / "config.json").exists()):
        raise ModelDirError(f"{os.fspath(url)}: model directory not found (or not committed: a write to it is "
                            "unfinished)")
    return local_copy(url, default_gcs_cache(), skip=(COMMIT_MARKER,))


def load_model(path: str | os.PathLike, *, dtype: Any = None, mesh: Any = None, compute_dtype: ComputeDtype | None = None,
               remat: bool | None = None, scan_layers: bool | None = None,
               tokenizer: str | os.PathLike | None = None, allow_pickle: bool = False,
               num_labels: int | None = None) -> Model:
    """The model at `path`: a Hugging Face directory, a directory written by training, a Hub id
    (fetched into the Hub cache on first use), or "default" for the bundled model.

    `dtype` is the parameter dtype (default float32); `mesh` is None (one local device), a Mesh
    (parameters placed by the partition rules as they are read), or a {"a/b/kernel": Sharding}
    mapping. `compute_dtype` and `remat` override the config's; `scan_layers=True` stacks the
    blocks' parameters for a scanned decoder (`pdpo_jax.model.layer_stack`); `tokenizer` loads
    the tokenizer from another directory. `num_labels` reads a sequence classifier's parameters
    (the trunk and its `score` head, see `pdpo_jax.model.classifier`) instead of a causal LM's.
    """
    model_dir = resolve_model_dir(path)
    if is_orbax_model_dir(model_dir):
        config, params = load_orbax_params(model_dir, dtype=dtype, shardings=mesh, num_labels=num_labels)
    else:
        config, params = load_hf(model_dir, dtype=dtype, shardings=mesh, allow_pickle=allow_pickle,
                                 num_labels=num_labels)
    if compute_dtype is not None:
        config = config.replace(dtype=compute_dtype)
    if remat is not None:
        config = config.replace(remat=remat)
    if scan_layers is not None:
        config = config.replace(scan_layers=scan_layers)
        params = in_layout(params, config, donate=True)
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else model_dir
    loaded_tokenizer = None
    if has_tokenizer_files(tokenizer_dir):
        from transformers import AutoTokenizer

        loaded_tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir))
    elif tokenizer is not None:
        raise ModelDirError(f"{tokenizer_dir}: no tokenizer files here")
    return Model(config=config, params=params, tokenizer=loaded_tokenizer, path=model_dir)
