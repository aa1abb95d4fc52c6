"""ModelConfig: the few numbers the decoder needs, read from (and written back to) HF config.json.

Each model family (`pdpo_jax.model.families`) reads and writes the keys of its own model types;
this module holds what they share. Every option of a supported model type either maps onto a field
here or is refused with a ValueError naming the file and key; an option we do not implement must
never be dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from pdpo_jax.model.family import family_for, family_names, family_of_model_type, supported_model_types

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "silu", "swish", "relu")
COMPUTE_DTYPES = ("float32", "bfloat16")
# keys each rope type needs, besides rope_type / rope_theta
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class ModelConfig:
    family: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2, Llama attention_bias)
    attention_out_bias: bool = False  # bias on o_proj (Llama attention_bias=True only)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    activation: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = False  # run-time layout: the blocks as one scanned layer (docs/design.md)

    def __post_init__(self) -> None:
        if self.family not in family_names():
            raise ValueError(f"ModelConfig.family must be one of {family_names()}, got {self.family!r}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"ModelConfig.dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rope_scaling is not None:
            _validate_rope_scaling(self.rope_scaling, "ModelConfig")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    def __hash__(self) -> int:  # rope_scaling is a dict; hash its items so the config can be static
        fields = dataclasses.astuple(self)
        return hash(tuple(tuple(sorted(f.items())) if isinstance(f, dict) else f for f in fields))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, source: str = "config.json", **overrides: Any) -> "ModelConfig":
        """Reads a transformers config dict (transformers 4 or 5 layout); `overrides` set dtype/remat."""
        model_type = config.get("model_type")
        family = family_of_model_type(model_type)
        if family is None:
            raise ValueError(
                f"{source}: key 'model_type' = {model_type!r} is not supported "
                f"(supported: {supported_model_types()})"
            )
        reader = HfConfigReader(config, source)
        fields = family.read_hf(reader, model_type)
        fields.update(
            model_type=model_type,
            family=family.name,
            bos_token_id=reader.optional("bos_token_id"),
            eos_token_id=_eos(reader.optional("eos_token_id")),
            pad_token_id=reader.optional("pad_token_id"),
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "ModelConfig":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: config.json not found")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_hf(data, source=path, **overrides)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers loads into the matching *ForCausalLM."""
        family = family_for(self)
        common = {
            "architectures": [family.architectures[self.model_type].causal_lm],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": "float32",
        }
        return common | family.write_hf(self)


class HfConfigReader:
    """Reads keys of one config dict; errors name the file and the key."""

    def __init__(self, config: Mapping[str, Any], source: str):
        self.config, self.source = config, source

    def required(self, key: str, kind: type = int) -> Any:
        if key not in self.config or self.config[key] is None:
            raise ValueError(f"{self.source}: missing required key {key!r}")
        return self.typed(key, kind)

    def optional(self, key: str, default: Any = None, kind: type | None = None) -> Any:
        if self.config.get(key) is None:
            return default
        return self.typed(key, kind) if kind else self.config[key]

    def typed(self, key: str, kind: type) -> Any:
        value = self.config[key]
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{self.source}: key {key!r} should be {kind.__name__}, got {value!r}")
        return value

    def refuse(self, key: str, supported: Any, why: str) -> None:
        if key in self.config and self.config[key] is not None and self.config[key] != supported:
            raise ValueError(f"{self.source}: key {key!r} = {self.config[key]!r} is not supported ({why})")


def read_activation(reader: HfConfigReader, key: str, default: str) -> str:
    act = reader.optional(key, default)
    if act not in ACTIVATIONS:
        raise ValueError(f"{reader.source}: key {key!r} = {act!r} is not a supported activation {ACTIVATIONS}")
    return act


def read_rope(r: HfConfigReader) -> tuple[float, dict | None]:
    """rope_theta + scaling from either `rope_parameters` (transformers 5) or the 4.x top-level keys."""
    key = "rope_parameters" if isinstance(r.config.get("rope_parameters"), dict) else "rope_scaling"
    params = dict(r.config.get(key) or {})
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = r.optional("rope_theta", 10000.0, float)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return float(theta), None
    scaling = {"rope_type": rope_type, **params}
    _validate_rope_scaling(scaling, f"{r.source}: key {key!r}")
    return float(theta), scaling


def _validate_rope_scaling(scaling: Mapping[str, Any], where: str) -> None:
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_SCALING_KEYS:
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (supported: default, {', '.join(ROPE_SCALING_KEYS)})")
    for name in ROPE_SCALING_KEYS[rope_type]:
        if not isinstance(scaling.get(name), (int, float)):
            raise ValueError(f"{where}: rope type {rope_type!r} needs a number for {name!r}, got {scaling.get(name)!r}")
    # attention_factor would rescale attention logits; only its neutral value is implemented
    if scaling.get("attention_factor") not in (None, 1, 1.0):
        raise ValueError(f"{where}: rope attention_factor {scaling['attention_factor']!r} is not supported")


def _eos(value: Any) -> int | tuple[int, ...] | None:
    if isinstance(value, list):
        return tuple(value)
    return value
