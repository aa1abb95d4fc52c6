"""The two layouts of the decoder's blocks, and the conversions between them.

Per layer: one parameter subtree per block, named "0", "1", ... as the Hugging Face names have
them (`model/layers/0/...`, `transformer/h/0/...`). This is the layout of every model on disk: HF
directories and the `params/` a training stage writes. Stacked: one subtree, `.../stacked/...`,
every leaf with a leading `[num_layers]` axis: the layout of a run with `model.scan_layers`,
whose decoder scans one block instead of unrolling them all. A scanned run stacks what it loads and
unstacks what it saves, so its models read and export like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from pdpo_jax.model.config import ModelConfig
from pdpo_jax.model.decoder import STACKED, backbone_name, block_stack_name


def stack_prefix(config: ModelConfig) -> str:
    """The "/"-joined path of the block collection: `transformer/h` or `model/layers`."""
    return f"{backbone_name(config)}/{block_stack_name(config)}"


def _split_stacked(path: str) -> tuple[str, str] | None:
    """("model/layers", "self_attn/q_proj/kernel") for "model/layers/stacked/self_attn/q_proj/kernel"."""
    marker = f"/{STACKED}/"
    if marker not in path:
        return None
    prefix, rest = path.split(marker, 1)
    return prefix, rest


def is_stacked(params: Any) -> bool:
    return any(_split_stacked(path) for path in traverse_util.flatten_dict(params, sep="/"))


def in_layout(params: Any, config: ModelConfig, *, donate: bool = False) -> Any:
    """`params` in the layout `config.scan_layers` asks for, converted if they are in the other.
    With `donate`, each source array is deleted as soon as its converted copy exists, so the
    conversion needs memory for one parameter of all layers beyond the model, not a second model."""
    if is_stacked(params) == config.scan_layers:
        return params
    if config.scan_layers:
        return stack_layers(params, config, donate=donate)
    return unstack_layers(params, donate=donate)


def stack_layers(params: Any, config: ModelConfig, *, donate: bool = False) -> Any:
    """Per-layer -> stacked. A sharded leaf keeps its split, with the layer axis unsplit."""
    flat = traverse_util.flatten_dict(params, sep="/")
    prefix = stack_prefix(config)
    out = {path: leaf for path, leaf in flat.items() if not path.startswith(prefix + "/")}
    first = f"{prefix}/0/"
    for path in [p for p in flat if p.startswith(first)]:
        rest = path[len(first):]
        layers = [flat[f"{prefix}/{i}/{rest}"] for i in range(config.num_layers)]
        out[f"{prefix}/{STACKED}/{rest}"] = _stack(layers)
        if donate:
            _delete(layers)
    return traverse_util.unflatten_dict(out, sep="/")


def unstack_layers(params: Any, *, donate: bool = False) -> Any:
    """Stacked -> per-layer, each layer's leaf split as the stacked one is, without its layer axis;
    per-layer parameters come back as they are."""
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {}
    for path, leaf in flat.items():
        split = _split_stacked(path)
        if split is None:
            out[path] = leaf
            continue
        prefix, rest = split
        for i, layer in enumerate(_unstack(leaf)):
            out[f"{prefix}/{i}/{rest}"] = layer
        if donate:
            _delete([leaf])
    return traverse_util.unflatten_dict(out, sep="/")


@dataclass(frozen=True)
class LayerLeaf:
    """One per-layer parameter, read lazily: the leaf itself, or layer `layer` of a stacked leaf."""

    array: Any
    layer: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(jnp.shape(self.array))
        return shape if self.layer is None else shape[1:]

    @property
    def dtype(self) -> Any:
        return self.array.dtype

    def value(self) -> Any:
        return self.array if self.layer is None else self.array[self.layer]


def per_layer_leaves(params: Any) -> dict[str, LayerLeaf]:
    """Every parameter under its per-layer name, whichever layout `params` is in; nothing is sliced
    until a leaf's `value()` is asked for, so a stacked model is never copied whole."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        split = _split_stacked(path)
        if split is None:
            out[path] = LayerLeaf(leaf)
            continue
        prefix, rest = split
        for i in range(jnp.shape(leaf)[0]):
            out[f"{prefix}/{i}/{rest}"] = LayerLeaf(leaf, i)
    return out


def _named(leaf: Any) -> NamedSharding | None:
    sharding = getattr(leaf, "sharding", None)
    return sharding if isinstance(sharding, NamedSharding) else None


def _stack(layers: list[Any]) -> Any:
    sharding = _named(layers[0])
    if sharding is None:
        return jnp.stack(layers)
    target = NamedSharding(sharding.mesh, P(None, *sharding.spec))
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=target)(*layers)


def _unstack(stacked: Any) -> list[Any]:
    count = jnp.shape(stacked)[0]
    sharding = _named(stacked)
    if sharding is None:
        return [stacked[i] for i in range(count)]
    target = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
    return list(jax.jit(lambda x: [x[i] for i in range(count)], out_shardings=[target] * count)(stacked))


def _delete(arrays: list[Any]) -> None:
    for array in arrays:
        if isinstance(array, jax.Array):
            array.delete()
