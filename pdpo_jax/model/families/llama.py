"""The Llama family: rotary positions, RMSNorm, grouped-query attention and a gated MLP.

Mistral (a sliding window) and Qwen2 (q/k/v biases, its own window keys) are Llama-family
configurations: model types of this family, told apart only when config.json is read and written.
A family that differs in its attention alone can reuse `LlamaBlock` with its own attention
(`attention_cls`), overriding `LlamaAttention.normalize_heads` (see docs/design.md, "Adding a
model family").
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from pdpo_jax.model.config import HfConfigReader, ModelConfig, read_activation, read_rope
from pdpo_jax.model.decoder import (ACTIVATION_FNS, RMSNorm, apply_rope, compute_dtype, dense, grouped_attention,
                                    heads_first, update_kv_cache)
from pdpo_jax.model.family import (GgufNames, HfArchitectures, KeyMapping, ModelFamily, ModuleNames,
                                   register_family)

# ----------------------------------------------------------------------------- config.json


def read_rotary_decoder(r: HfConfigReader) -> dict[str, Any]:
    """The ModelConfig fields every Llama-style config.json spells the same way."""
    hidden = r.required("hidden_size")
    heads = r.required("num_attention_heads")
    head_dim = r.optional("head_dim", None, int)
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"{r.source}: key 'hidden_size' = {hidden} is not divisible by 'num_attention_heads'")
        head_dim = hidden // heads
    num_layers = r.required("num_hidden_layers")
    rope_theta, rope_scaling = read_rope(r)
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
        tie_word_embeddings=bool(r.optional("tie_word_embeddings", False)),
        activation=read_activation(r, "hidden_act", "silu"),
    )


def refuse_mixed_layer_types(r: HfConfigReader, sliding_window: int | None) -> None:
    layer_types = r.optional("layer_types")
    if layer_types is not None:
        wanted = "sliding_attention" if sliding_window else "full_attention"
        if any(t != wanted for t in layer_types):
            raise ValueError(f"{r.source}: key 'layer_types' = {layer_types!r}: per-layer attention types are not supported")


def read_hf(r: HfConfigReader, model_type: str) -> dict[str, Any]:
    fields = read_rotary_decoder(r)
    if model_type == "qwen2":
        sliding_window = _qwen2_window(r, fields["num_layers"])
        attention_bias, attention_out_bias, mlp_bias = True, False, False
    else:
        sliding_window = r.optional("sliding_window", None, int) if model_type == "mistral" else None
        attention_bias = bool(r.optional("attention_bias", False))
        attention_out_bias = attention_bias
        mlp_bias = bool(r.optional("mlp_bias", False))
        refuse_mixed_layer_types(r, sliding_window)
    return fields | dict(sliding_window=sliding_window, attention_bias=attention_bias,
                         attention_out_bias=attention_out_bias, mlp_bias=mlp_bias)


def _qwen2_window(r: HfConfigReader, num_layers: int) -> int | None:
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


def write_rotary_decoder(c: ModelConfig) -> dict[str, Any]:
    rope_parameters = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        rope_parameters = dict(c.rope_scaling) | {"rope_theta": c.rope_theta}
    return {
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.norm_eps,
        "hidden_act": c.activation,
        "rope_parameters": rope_parameters,
    }


def write_hf(c: ModelConfig) -> dict[str, Any]:
    out = write_rotary_decoder(c)
    if c.model_type == "llama":
        out |= {"attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias}
    elif c.model_type == "mistral":
        out |= {"sliding_window": c.sliding_window}
    elif c.model_type == "qwen2":
        window = c.sliding_window is not None
        out |= {
            "use_sliding_window": window,
            "sliding_window": c.sliding_window,
            "max_window_layers": 0 if window else c.num_layers,
            "layer_types": [("sliding_attention" if window else "full_attention")] * c.num_layers,
        }
    return out


# ----------------------------------------------------------------------------- the block


class LlamaAttention(nn.Module):
    config: ModelConfig

    def normalize_heads(self, x, name: str):
        """q or k `[b, t, heads, head_dim]` before the rotary embedding (`name` "q_norm" or
        "k_norm"): Llama leaves them as they are; a family that normalises each head (Qwen3)
        overrides this and declares the norms in its key map."""
        return x

    @nn.compact
    def __call__(self, x, rope, mask, layer_cache, index):
        c, dt = self.config, compute_dtype(self.config)
        b, t, _ = x.shape
        q = dense(c.num_heads * c.head_dim, c.attention_bias, dt, "q_proj")(x)
        k = dense(c.num_kv_heads * c.head_dim, c.attention_bias, dt, "k_proj")(x)
        v = dense(c.num_kv_heads * c.head_dim, c.attention_bias, dt, "v_proj")(x)
        q = apply_rope(self.normalize_heads(q.reshape(b, t, c.num_heads, c.head_dim), "q_norm"), *rope)
        k = heads_first(apply_rope(self.normalize_heads(k.reshape(b, t, c.num_kv_heads, c.head_dim), "k_norm"), *rope))
        v = heads_first(v.reshape(b, t, c.num_kv_heads, c.head_dim))
        if layer_cache is not None:
            layer_cache = update_kv_cache(layer_cache, k, v, index)
            k, v = (a.astype(dt) for a in layer_cache)
        out = grouped_attention(q, k, v, mask).reshape(b, t, c.num_heads * c.head_dim)
        return dense(c.hidden_size, c.attention_out_bias, dt, "o_proj")(out), layer_cache


class LlamaMLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c, dt = self.config, compute_dtype(self.config)
        act = ACTIVATION_FNS[c.activation]
        gate = dense(c.intermediate_size, c.mlp_bias, dt, "gate_proj")(x)
        up = dense(c.intermediate_size, c.mlp_bias, dt, "up_proj")(x)
        return dense(c.hidden_size, c.mlp_bias, dt, "down_proj")(act(gate) * up)


class LlamaBlock(nn.Module):
    config: ModelConfig
    attention_cls = LlamaAttention  # a class attribute, not a field: a subclass swaps the attention

    @nn.compact
    def __call__(self, x, rope, mask, layer_cache, index):
        c, dt = self.config, compute_dtype(self.config)
        h = RMSNorm(c.norm_eps, dt, name="input_layernorm")(x)
        h, layer_cache = self.attention_cls(c, name="self_attn")(h, rope, mask, layer_cache, index)
        x = x + h
        h = RMSNorm(c.norm_eps, dt, name="post_attention_layernorm")(x)
        return x + LlamaMLP(c, name="mlp")(h), layer_cache


def rms_norm(config: ModelConfig, name: str) -> RMSNorm:
    return RMSNorm(config.norm_eps, compute_dtype(config), name=name)


# ----------------------------------------------------------------------------- names and axes

KEY_MAP: tuple[KeyMapping, ...] = (
    KeyMapping("model.embed_tokens.weight", "model/embed_tokens/embedding", axes=("vocab", "embed")),
    *(KeyMapping(f"model.layers.{{i}}.self_attn.{p}_proj.weight", f"model/layers/{{i}}/self_attn/{p}_proj/kernel",
                 "transpose", axes=axes)
      for p, axes in (("q", ("embed", "heads")), ("k", ("embed", "kv_heads")), ("v", ("embed", "kv_heads")),
                      ("o", ("heads", "embed")))),
    *(KeyMapping(f"model.layers.{{i}}.self_attn.{p}_proj.bias", f"model/layers/{{i}}/self_attn/{p}_proj/bias",
                 when=lambda c: c.attention_bias) for p in "qkv"),
    KeyMapping("model.layers.{i}.self_attn.o_proj.bias", "model/layers/{i}/self_attn/o_proj/bias", when=lambda c: c.attention_out_bias),
    *(KeyMapping(f"model.layers.{{i}}.mlp.{p}_proj.weight", f"model/layers/{{i}}/mlp/{p}_proj/kernel", "transpose", axes=axes)
      for p, axes in (("gate", ("embed", "mlp")), ("up", ("embed", "mlp")), ("down", ("mlp", "embed")))),
    *(KeyMapping(f"model.layers.{{i}}.mlp.{p}_proj.bias", f"model/layers/{{i}}/mlp/{p}_proj/bias",
                 when=lambda c: c.mlp_bias) for p in ("gate", "up", "down")),
    KeyMapping("model.layers.{i}.input_layernorm.weight", "model/layers/{i}/input_layernorm/weight"),
    KeyMapping("model.layers.{i}.post_attention_layernorm.weight", "model/layers/{i}/post_attention_layernorm/weight"),
    KeyMapping("model.norm.weight", "model/norm/weight"),
    KeyMapping("lm_head.weight", "lm_head/kernel", "transpose", when=lambda c: not c.tie_word_embeddings,
               axes=("embed", "vocab")),
)
MODULE_NAMES = ModuleNames(backbone="model", embedding="embed_tokens", blocks="layers", final_norm="norm")

GGUF_NAMES = GgufNames(
    architecture="llama",
    tensors={
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "output": "lm_head",
        "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
        "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
        "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
        "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
        "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
        "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
        "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
        "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
        "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    },
    rotary_rows={"blk.{i}.attn_q": "num_heads", "blk.{i}.attn_k": "num_kv_heads"},
)

LLAMA = register_family(ModelFamily(
    name="llama",
    architectures={
        "llama": HfArchitectures("LlamaForCausalLM", "LlamaForSequenceClassification"),
        "mistral": HfArchitectures("MistralForCausalLM", "MistralForSequenceClassification"),
        "qwen2": HfArchitectures("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    },
    read_hf=read_hf,
    write_hf=write_hf,
    block=LlamaBlock,
    final_norm=rms_norm,
    names=MODULE_NAMES,
    key_map=KEY_MAP,
    gguf=GGUF_NAMES,
))
