"""Hugging Face checkpoints in and out: config.json + safetensors (single or sharded), flax_model.msgpack,
and (only when asked) pickled pytorch_model.bin.

Each model family's declarative key map (`pdpo_jax.model.families`) names every tensor: the PyTorch
name with `{i}` for the layer, our Flax path, and the transform between them. Both directions read the same table, so
import and export cannot drift apart. A sequence classifier (`num_labels` given) has the same
trunk and, instead of `lm_head`, the bias-free `score` head of transformers'
*ForSequenceClassification.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from pdpo_jax import parallel
from pdpo_jax.model.config import ModelConfig
from pdpo_jax.model.decoder import param_shapes
from pdpo_jax.model.family import CLASSIFIER_HEAD, LM_HEAD, TRANSFORMS, family_for
from pdpo_jax.model.layer_stack import per_layer_leaves
from pdpo_jax.object_store import as_path
from pdpo_jax.storage import commit_directory

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MSGPACK_FILE = "flax_model.msgpack"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# tensors some checkpoints carry that are buffers, not parameters
IGNORED_TENSORS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")


def expand_key_map(config: ModelConfig, num_labels: int | None = None) -> list[tuple[str, str, str]]:
    """(hf name, flax path, transform) for every tensor of this config, layers expanded; with
    `num_labels`, those of a sequence classifier (the trunk, then `score`)."""
    rows = []
    for mapping in family_for(config).key_map:
        if not mapping.when(config) or (num_labels is not None and mapping.flax == LM_HEAD):
            continue
        layers = range(config.num_layers) if "{i}" in mapping.hf else [None]
        for i in layers:
            rows.append((mapping.hf.format(i=i), mapping.flax.format(i=i), mapping.transform))
    if num_labels is not None:
        rows.append((CLASSIFIER_HEAD.hf, CLASSIFIER_HEAD.flax, CLASSIFIER_HEAD.transform))
    return rows


# ----------------------------------------------------------------------------- reading tensors


class TensorSource:
    """Name -> numpy tensor over one checkpoint's files, opened lazily and memory-mapped."""

    def __init__(self, files_by_name: Mapping[str, Path], opener: Callable[[Path], Any]):
        self.files_by_name = dict(files_by_name)
        self._opener = opener
        self._handles: dict[Path, Any] = {}

    def names(self) -> list[str]:
        return list(self.files_by_name)

    def file_of(self, name: str) -> Path:
        return self.files_by_name[name]

    def get(self, name: str) -> np.ndarray:
        path = self.files_by_name[name]
        try:
            if path not in self._handles:
                self._handles[path] = self._opener(path)
            return np.asarray(self._handles[path].get_tensor(name))
        except Exception as err:  # noqa: BLE001 - corrupt files raise library-specific errors
            raise ValueError(f"{path}: cannot read tensor {name!r} ({type(err).__name__}: {err})") from err


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(os.fspath(path), framework="numpy")
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err


def _safetensors_names(path: Path) -> list[str]:
    return list(_open_safetensors(path).keys())


def _read_index(index_path: Path) -> dict[str, Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{index_path}: not valid JSON ({err})") from err
    except (KeyError, TypeError) as err:
        raise ValueError(f"{index_path}: missing key 'weight_map'") from err
    files = {}
    for name, file_name in weight_map.items():
        shard = index_path.parent / file_name
        if not shard.is_file():
            raise FileNotFoundError(f"{index_path}: shard {file_name!r} listed for tensor {name!r} does not exist")
        files[name] = shard
    return files


class _TorchFile:
    def __init__(self, path: Path):
        import torch

        self.state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)

    def get_tensor(self, name: str) -> np.ndarray:
        return self.state[name].float().numpy()


def open_tensor_source(model_dir: Path, *, allow_pickle: bool) -> TensorSource:
    if (model_dir / SAFETENSORS_FILE).is_file():
        path = model_dir / SAFETENSORS_FILE
        return TensorSource({n: path for n in _safetensors_names(path)}, _open_safetensors)
    if (model_dir / SAFETENSORS_INDEX).is_file():
        return TensorSource(_read_index(model_dir / SAFETENSORS_INDEX), _open_safetensors)
    pickled = [p for p in (model_dir / PICKLE_FILE, model_dir / PICKLE_INDEX) if p.is_file()]
    if pickled and not allow_pickle:
        raise ValueError(
            f"{pickled[0]}: refusing to load a pickled PyTorch checkpoint (it can run arbitrary code); "
            f"convert it to safetensors or pass allow_pickle=True if you trust its source"
        )
    if (model_dir / PICKLE_FILE).is_file():
        path = model_dir / PICKLE_FILE
        handle = _TorchFile(path)
        return TensorSource({n: path for n in handle.state}, lambda _: handle)
    if (model_dir / PICKLE_INDEX).is_file():
        return TensorSource(_read_index(model_dir / PICKLE_INDEX), _TorchFile)
    raise FileNotFoundError(
        f"{model_dir}: no weights found (looked for {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
        f"{MSGPACK_FILE}, {PICKLE_FILE})"
    )


# ----------------------------------------------------------------------------- placing arrays


Placer = Callable[[str, np.ndarray], Any]


def make_placer(shardings: Any, shapes: Mapping[str, tuple[int, ...]], dtype: Any) -> Placer:
    """Where each array goes: host numpy (None), a Mesh (the rules of parallel.py), or a mapping of
    "/"-joined paths to Shardings. Each array is put on its devices as soon as it is read."""
    if shardings is None:
        def to_default_device(path: str, array: np.ndarray) -> Any:
            return jax.numpy.asarray(array.astype(dtype, copy=False))
        return to_default_device
    if isinstance(shardings, Mesh):
        mesh = shardings
        specs = parallel.partition_specs_for_shapes(shapes, mesh=mesh)
        shardings = {path: jax.sharding.NamedSharding(mesh, spec) for path, spec in specs.items()}

    def to_sharding(path: str, array: np.ndarray) -> Any:
        if path not in shardings:
            raise ValueError(f"no sharding given for parameter {path!r}")
        # Each device's slice is read (from the memory-mapped file) and converted on its own, so
        # a host never holds more than its devices' parts of a tensor.
        return jax.make_array_from_callback(array.shape, shardings[path],
                                            lambda index: np.asarray(array[index]).astype(dtype, copy=False))

    return to_sharding


# ----------------------------------------------------------------------------- load


def read_config(model_dir: Path, **overrides: Any) -> ModelConfig:
    return ModelConfig.from_json_file(model_dir / CONFIG_FILE, **overrides)


def expected_shapes(config: ModelConfig, num_labels: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape by "/"-joined path: the decoder's, or with `num_labels` a sequence
    classifier's (no lm_head; `score/kernel` [hidden, num_labels])."""
    flat = traverse_util.flatten_dict(param_shapes(config), sep="/")
    shapes = {path: tuple(leaf.shape) for path, leaf in flat.items()}
    if num_labels is not None:
        shapes.pop(LM_HEAD, None)
        shapes[CLASSIFIER_HEAD.flax] = (config.hidden_size, num_labels)
    return shapes


def load_hf(path: str | os.PathLike, *, dtype: Any = None, shardings: Any = None, allow_pickle: bool = False,
            config_overrides: Mapping[str, Any] | None = None, num_labels: int | None = None) -> tuple[ModelConfig, Any]:
    """(ModelConfig, params) from a Hugging Face model directory (with `num_labels`, a
    *ForSequenceClassification one).

    `dtype` is the parameter dtype (default float32); `shardings` is None (default device), a
    jax Mesh (partition rules of pdpo_jax.parallel) or a {"a/b/kernel": Sharding} mapping.
    """
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory not found")
    config = read_config(model_dir, **dict(config_overrides or {}))
    shapes = expected_shapes(config, num_labels)
    place = make_placer(shardings, shapes, jax.numpy.dtype(dtype or "float32"))
    has_torch_weights = any((model_dir / f).is_file() for f in (SAFETENSORS_FILE, SAFETENSORS_INDEX, PICKLE_FILE, PICKLE_INDEX))
    if not has_torch_weights and (model_dir / MSGPACK_FILE).is_file():
        flat = _load_msgpack(model_dir / MSGPACK_FILE, shapes, place)
    else:
        source = open_tensor_source(model_dir, allow_pickle=allow_pickle)
        flat = _load_torch_layout(source, config, shapes, place, num_labels)
    return config, traverse_util.unflatten_dict(flat, sep="/")


def _load_torch_layout(source: TensorSource, config: ModelConfig, shapes: Mapping[str, tuple[int, ...]], place: Placer,
                       num_labels: int | None = None) -> dict[str, Any]:
    available = set(source.names())
    prefix = family_for(config).names.backbone + "."  # checkpoints saved from the bare backbone lack it
    used: set[str] = set()
    flat = {}
    for hf_name, flax_path, transform in expand_key_map(config, num_labels):
        name = hf_name
        if name not in available and name.startswith(prefix) and name[len(prefix):] in available:
            name = name[len(prefix):]
        if name not in available:
            where = source.file_of(next(iter(available))) if available else "checkpoint"
            raise ValueError(f"{where}: missing tensor {hf_name!r} (needed for {flax_path})")
        array = TRANSFORMS[transform](source.get(name))
        if array.shape != shapes[flax_path]:
            raise ValueError(
                f"{source.file_of(name)}: tensor {name!r} has shape {tuple(array.shape)} after {transform}, "
                f"expected {shapes[flax_path]} for {flax_path} from config.json"
            )
        flat[flax_path] = place(flax_path, array)
        used.add(name)
    leftover = {n for n in available - used if not IGNORED_TENSORS.search(n)}
    if config.tie_word_embeddings:
        leftover.discard("lm_head.weight")  # some exporters save the tied copy; transformers ignores it too
    if leftover:
        name = sorted(leftover)[0]
        raise ValueError(
            f"{source.file_of(name)}: tensor {name!r} (and {len(leftover) - 1} more) has no place in a "
            f"{config.model_type} model with this config.json; refusing to drop weights silently"
        )
    return flat


def _load_msgpack(path: Path, shapes: Mapping[str, tuple[int, ...]], place: Placer) -> dict[str, Any]:
    from flax import serialization

    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable msgpack parameter file ({type(err).__name__}: {err})") from err
    if isinstance(tree, dict) and set(tree) == {"params"}:
        tree = tree["params"]
    flat = traverse_util.flatten_dict(tree, sep="/")
    missing = sorted(set(shapes) - set(flat))
    if missing:
        raise ValueError(f"{path}: missing parameter {missing[0]!r} ({len(missing)} missing in all)")
    extra = sorted(set(flat) - set(shapes))
    if extra:
        raise ValueError(f"{path}: unexpected parameter {extra[0]!r} for this config.json ({len(extra)} in all)")
    out = {}
    for key, shape in shapes.items():
        array = np.asarray(flat[key])
        if array.shape != shape:
            raise ValueError(f"{path}: parameter {key!r} has shape {array.shape}, expected {shape}")
        out[key] = place(key, array)
    return out


# ----------------------------------------------------------------------------- save


def _hf_sources(config: ModelConfig, params: Any, num_labels: int | None = None) -> list[tuple[str, Any, str]]:
    """(torch name, `LayerLeaf`, transform) of every tensor an export writes, in key-map order;
    a tied lm_head is not among them. `params` may be per-layer or stacked."""
    leaves = per_layer_leaves(params)
    sources = []
    for hf_name, flax_path, transform in expand_key_map(config, num_labels):
        if flax_path not in leaves:
            raise ValueError(f"params: missing {flax_path!r} needed for {hf_name!r}")
        sources.append((hf_name, leaves[flax_path], transform))
    return sources


def to_hf_tensors(config: ModelConfig, params: Any, num_labels: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(torch name, numpy array) for every tensor, in key-map order; tied lm_head is not written."""
    for hf_name, leaf, transform in _hf_sources(config, params, num_labels):
        yield hf_name, np.ascontiguousarray(TRANSFORMS[transform](parallel.to_host(leaf.value())))


def hf_tensor_sizes(config: ModelConfig, params: Any, num_labels: int | None = None) -> list[tuple[str, int]]:
    """(torch name, bytes) of every tensor `to_hf_tensors` yields, in its order, without reading one."""
    return [(hf_name, int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize)
            for hf_name, leaf, _ in _hf_sources(config, params, num_labels)]


def _shard_groups(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def write_safetensors(out_dir: Path, tensors: Iterable[tuple[str, np.ndarray]], sizes: Sequence[tuple[str, int]],
                      max_shard_bytes: int) -> None:
    """The tensors as one safetensors file, or as shards of at most `max_shard_bytes` with an index.
    `tensors` is consumed one shard at a time (`sizes` plans the shards), so a host never holds
    more than one shard of a large model."""
    from safetensors.numpy import save_file

    groups = _shard_groups(sizes, max_shard_bytes)
    names = [SAFETENSORS_FILE] if len(groups) == 1 else \
        [f"model-{n:05d}-of-{len(groups):05d}.safetensors" for n in range(1, len(groups) + 1)]
    stream = iter(tensors)
    weight_map = {}
    for file_name, group in zip(names, groups):
        shard = dict(next(stream) for _ in group)
        if list(shard) != group:
            raise ValueError(f"{out_dir / file_name}: tensors came in another order than planned")
        save_file(shard, os.fspath(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in group})
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(nbytes for _, nbytes in sizes)}, "weight_map": weight_map}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def default_generation_config(config: ModelConfig) -> dict[str, Any]:
    out = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items() if v is not None}
    return out


def save_hf(out_dir: str | os.PathLike, config: ModelConfig, params: Any, *, tokenizer: Any = None,
            max_shard_bytes: int = 2 * 1024**3, generation_config: Any = None,
            hf_config: Mapping[str, Any] | None = None, num_labels: int | None = None) -> Path:
    """Writes a directory transformers loads: config.json, safetensors (sharded with an index above
    `max_shard_bytes`), tokenizer files, generation_config.json. Built beside `out_dir` and swapped in
    whole (`pdpo_jax.storage.commit_directory`), so a crash never leaves a half-written model there.

    A sequence classifier passes `num_labels` and its config.json dict as `hf_config` (default:
    `config.to_hf()`, a causal LM)."""
    out_dir = as_path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if jax.process_index() != 0:
        for _ in to_hf_tensors(config, params, num_labels):  # join the gathers of sharded arrays, keep nothing
            pass
        return out_dir
    with commit_directory(out_dir, local_staging=True) as building:  # on gs://: uploaded, then committed
        hf_config = config.to_hf() if hf_config is None else dict(hf_config)
        (building / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        write_safetensors(building, to_hf_tensors(config, params, num_labels),
                          hf_tensor_sizes(config, params, num_labels), max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(os.fspath(building))
        gen = generation_config if generation_config is not None else default_generation_config(config)
        if hasattr(gen, "to_dict"):
            gen = gen.to_dict()
        (building / GENERATION_CONFIG_FILE).write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    return out_dir
