"""What a model family declares, and the registry the decoder, loading and sharding look it up in.

A family (GPT-2, Llama; Mistral and Qwen2 are Llama-family configurations) is one module under
`pdpo_jax/model/families/` that builds a `ModelFamily` and calls `register_family`: the
config.json model types it reads and writes, its block, the names of its modules, its checkpoint
key map with every parameter's logical axes, and its GGUF tensor names. Nothing else in the
project names a family; `family_for(config)` answers for the one a `ModelConfig` belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from pdpo_jax import parallel

if TYPE_CHECKING:
    from pdpo_jax.model.config import HfConfigReader, ModelConfig


def _transpose_both_ways(x: np.ndarray) -> np.ndarray:
    return x.T


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"none": lambda x: x, "transpose": _transpose_both_ways}
REPLICATED: tuple[str | None, ...] = ()  # the logical axes of a parameter that is never split (norms, biases)


@dataclass(frozen=True)
class KeyMapping:
    """One parameter: `hf` is its PyTorch state-dict name, `flax` our "/"-joined path (`{i}` stands
    for the layer in both), `axes` the logical axis of each dimension on our side (see
    `pdpo_jax.parallel.ShardingRules`).

    transform "transpose": the 2-D weight is stored transposed on our side (torch Linear is
    [out, in], Flax Dense [in, out]; GPT-2's Conv1D is [in, out] in torch, [out, in] in HF Flax).
    `when` says whether a config has the parameter at all (a bias, an untied lm_head).
    """

    hf: str
    flax: str
    transform: str = "none"
    when: Callable[[ModelConfig], bool] = lambda config: True
    axes: tuple[str | None, ...] = REPLICATED

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"{self.hf}: transform {self.transform!r} is not one of {sorted(TRANSFORMS)}")


LM_HEAD = "lm_head/kernel"
# *ForSequenceClassification's head, the same for every family: torch Linear [num_labels, hidden], no bias
CLASSIFIER_HEAD = KeyMapping("score.weight", "score/kernel", "transpose")


@dataclass(frozen=True)
class HfArchitectures:
    """The transformers classes of one config.json model type."""

    causal_lm: str  # "LlamaForCausalLM"
    sequence_classifier: str | None = None  # "LlamaForSequenceClassification"; None: no classifier


@dataclass(frozen=True)
class ModuleNames:
    """The Flax module names of a family, as Hugging Face's Flax models have them."""

    backbone: str  # "model"; also the state-dict prefix of a checkpoint saved without its head
    embedding: str  # "embed_tokens"
    blocks: str  # "layers"
    final_norm: str  # "norm"
    positions: str | None = None  # a learned absolute position table ("wpe"); None: rotary positions


@dataclass(frozen=True)
class GgufNames:
    """How llama.cpp names a family's tensors: GGUF stem -> state-dict stem (`{i}` the layer), and
    the GGUF stems whose rows llama.cpp permuted for its rotary order, with the name of their head
    count (`num_heads`, `num_kv_heads`)."""

    architecture: str  # general.architecture
    tensors: Mapping[str, str]  # "token_embd" -> "model.embed_tokens", "blk.{i}.attn_q" -> "model.layers.{i}...."
    rotary_rows: Mapping[str, str] = field(default_factory=dict)  # "blk.{i}.attn_q" -> "num_heads"


@dataclass(frozen=True)
class ModelFamily:
    """Everything the project needs to know about one family of decoders.

    `read_hf(reader, model_type)` returns the ModelConfig fields of a config.json (all but
    model_type, family and the special token ids) and refuses, naming the key, any option it does
    not implement; `write_hf(config)` returns the config.json keys beyond the ones every family
    shares. `block(config, name=...)` is a Flax module called as
    `(x, rope, mask, layer_cache, index) -> (x, layer_cache)`; `final_norm(config, name)` builds
    the norm after the last block.
    """

    name: str
    architectures: Mapping[str, HfArchitectures]  # config.json model_type -> its transformers classes
    read_hf: Callable[[HfConfigReader, str], dict[str, Any]]
    write_hf: Callable[[ModelConfig], dict[str, Any]]
    block: Any
    final_norm: Callable[[ModelConfig, str], Any]
    names: ModuleNames
    key_map: Sequence[KeyMapping]
    gguf: GgufNames | None = None

    @property
    def learned_positions(self) -> bool:
        return self.names.positions is not None


_FAMILIES: dict[str, ModelFamily] = {}
_FAMILY_OF_MODEL_TYPE: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Makes `family` known to config reading, the decoder, checkpoints and sharding."""
    if _FAMILIES.get(family.name, family) is not family:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    taken = [t for t in family.architectures if _FAMILY_OF_MODEL_TYPE.get(t, family) is not family]
    if taken:
        raise ValueError(f"model type {taken[0]!r} already belongs to family {_FAMILY_OF_MODEL_TYPE[taken[0]].name!r}")
    for mapping in family.key_map:
        parallel.declare_param_axes(mapping.flax, mapping.axes)
    _FAMILIES[family.name] = family
    _FAMILY_OF_MODEL_TYPE.update({model_type: family for model_type in family.architectures})
    return family


def family_for(config: ModelConfig) -> ModelFamily:
    """The registered family of `config`."""
    return _FAMILIES[config.family]


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def family_of_model_type(model_type: Any) -> ModelFamily | None:
    """The family that reads config.json files of `model_type`, or None."""
    return _FAMILY_OF_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None


def supported_model_types() -> list[str]:
    return sorted(_FAMILY_OF_MODEL_TYPE)


def family_of_gguf_architecture(architecture: Any) -> ModelFamily | None:
    return next((f for f in _FAMILIES.values() if f.gguf is not None and f.gguf.architecture == architecture), None)


def gguf_architectures() -> list[str]:
    return sorted(f.gguf.architecture for f in _FAMILIES.values() if f.gguf is not None)


parallel.declare_param_axes(CLASSIFIER_HEAD.flax, CLASSIFIER_HEAD.axes)
