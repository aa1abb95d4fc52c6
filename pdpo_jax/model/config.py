"""ModelConfig: the few numbers the decoder needs, read from (and written back to) HF config.json.

Every option of a supported model type either maps onto a field here or is refused with a
ValueError naming the file and key; an option we do not implement must never be dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

FAMILY_OF_MODEL_TYPE = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
ARCHITECTURE_OF_MODEL_TYPE = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
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
        if self.family not in ("gpt2", "llama"):
            raise ValueError(f"ModelConfig.family must be 'gpt2' or 'llama', got {self.family!r}")
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
        if model_type not in FAMILY_OF_MODEL_TYPE:
            raise ValueError(
                f"{source}: key 'model_type' = {model_type!r} is not supported "
                f"(supported: {sorted(FAMILY_OF_MODEL_TYPE)})"
            )
        reader = _Reader(config, source)
        fields = _gpt2_fields(reader) if model_type == "gpt2" else _llama_fields(reader, model_type)
        fields.update(
            model_type=model_type,
            family=FAMILY_OF_MODEL_TYPE[model_type],
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
        common = {
            "architectures": [ARCHITECTURE_OF_MODEL_TYPE[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": "float32",
        }
        if self.family == "gpt2":
            return common | {
                "n_embd": self.hidden_size,
                "n_layer": self.num_layers,
                "n_head": self.num_heads,
                "n_inner": self.intermediate_size,
                "n_positions": self.max_position_embeddings,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": self.activation,
                "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False,
            }
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters = dict(self.rope_scaling) | {"rope_theta": self.rope_theta}
        out = common | {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "hidden_act": self.activation,
            "rope_parameters": rope_parameters,
        }
        if self.model_type == "llama":
            out |= {"attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias}
        elif self.model_type == "mistral":
            out |= {"sliding_window": self.sliding_window}
        elif self.model_type == "qwen2":
            window = self.sliding_window is not None
            out |= {
                "use_sliding_window": window,
                "sliding_window": self.sliding_window,
                "max_window_layers": 0 if window else self.num_layers,
                "layer_types": [("sliding_attention" if window else "full_attention")] * self.num_layers,
            }
        return out


class _Reader:
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


def _activation(reader: _Reader, key: str, default: str) -> str:
    act = reader.optional(key, default)
    if act not in ACTIVATIONS:
        raise ValueError(f"{reader.source}: key {key!r} = {act!r} is not a supported activation {ACTIVATIONS}")
    return act


def _gpt2_fields(r: _Reader) -> dict[str, Any]:
    r.refuse("scale_attn_by_inverse_layer_idx", False, "per-layer attention scaling is not implemented")
    r.refuse("scale_attn_weights", True, "unscaled attention is not implemented")
    r.refuse("add_cross_attention", False, "cross-attention is not part of a causal decoder")
    hidden = r.required("n_embd")
    heads = r.required("n_head")
    if hidden % heads:
        raise ValueError(f"{r.source}: key 'n_embd' = {hidden} is not divisible by 'n_head' = {heads}")
    return dict(
        vocab_size=r.required("vocab_size"),
        hidden_size=hidden,
        num_layers=r.required("n_layer"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=r.optional("n_inner", 4 * hidden, int),
        max_position_embeddings=r.required("n_positions"),
        norm_eps=r.optional("layer_norm_epsilon", 1e-5, float),
        activation=_activation(r, "activation_function", "gelu_new"),
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        tie_word_embeddings=bool(r.optional("tie_word_embeddings", True)),
    )


def _llama_fields(r: _Reader, model_type: str) -> dict[str, Any]:
    hidden = r.required("hidden_size")
    heads = r.required("num_attention_heads")
    head_dim = r.optional("head_dim", None, int)
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"{r.source}: key 'hidden_size' = {hidden} is not divisible by 'num_attention_heads'")
        head_dim = hidden // heads
    num_layers = r.required("num_hidden_layers")
    rope_theta, rope_scaling = _rope(r)
    if model_type == "qwen2":
        sliding_window = _qwen2_window(r, num_layers)
        attention_bias, attention_out_bias, mlp_bias = True, False, False
    else:
        sliding_window = r.optional("sliding_window", None, int) if model_type == "mistral" else None
        attention_bias = bool(r.optional("attention_bias", False))
        attention_out_bias = attention_bias
        mlp_bias = bool(r.optional("mlp_bias", False))
    layer_types = r.optional("layer_types")
    if layer_types is not None and model_type != "qwen2":
        wanted = "sliding_attention" if sliding_window else "full_attention"
        if any(t != wanted for t in layer_types):
            raise ValueError(f"{r.source}: key 'layer_types' = {layer_types!r}: per-layer attention types are not supported")
    return dict(
        vocab_size=r.required("vocab_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=r.optional("num_key_value_heads", heads, int),
        head_dim=head_dim,
        intermediate_size=r.required("intermediate_size"),
        max_position_embeddings=r.optional("max_position_embeddings", 2048, int),
        norm_eps=r.optional("rms_norm_eps", 1e-6, float),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        sliding_window=sliding_window,
        attention_bias=attention_bias,
        attention_out_bias=attention_out_bias,
        mlp_bias=mlp_bias,
        tie_word_embeddings=bool(r.optional("tie_word_embeddings", False)),
        activation=_activation(r, "hidden_act", "silu"),
    )


def _qwen2_window(r: _Reader, num_layers: int) -> int | None:
    """Qwen2 slides only layers >= max_window_layers, and only when use_sliding_window is set."""
    if not r.optional("use_sliding_window", False):
        return None
    window = r.required("sliding_window")
    first_sliding = r.optional("max_window_layers", 0, int)
    if first_sliding >= num_layers:
        return None
    if first_sliding > 0:
        raise ValueError(
            f"{r.source}: key 'max_window_layers' = {first_sliding} with use_sliding_window=true mixes "
            f"full and sliding-window layers, which is not supported"
        )
    return window


def _rope(r: _Reader) -> tuple[float, dict | None]:
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
