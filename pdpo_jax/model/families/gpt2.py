"""The GPT-2 family: learned positions, LayerNorm, fused q/k/v and Conv1D projections.

Conv1D kernels are stored as HF Flax stores them, [out, in]: PyTorch's Conv1D is already [in, out],
hence the transposes of the key map and the mirrored logical axes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pdpo_jax.model.config import HfConfigReader, ModelConfig, read_activation
from pdpo_jax.model.decoder import (ACTIVATION_FNS, Conv1D, compute_dtype, grouped_attention, heads_first,
                                    update_kv_cache)
from pdpo_jax.model.family import REPLICATED, HfArchitectures, KeyMapping, ModelFamily, ModuleNames, register_family


def read_hf(r: HfConfigReader, model_type: str) -> dict[str, Any]:
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
        activation=read_activation(r, "activation_function", "gelu_new"),
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        tie_word_embeddings=bool(r.optional("tie_word_embeddings", True)),
    )


def write_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "n_embd": c.hidden_size,
        "n_layer": c.num_layers,
        "n_head": c.num_heads,
        "n_inner": c.intermediate_size,
        "n_positions": c.max_position_embeddings,
        "layer_norm_epsilon": c.norm_eps,
        "activation_function": c.activation,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
    }


class GPT2Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, rope, mask, layer_cache, index):
        c, dt = self.config, compute_dtype(self.config)
        b, t, _ = x.shape
        qkv = Conv1D(3 * c.hidden_size, dt, name="c_attn")(x)
        q, k, v = (a.reshape(b, t, c.num_heads, c.head_dim) for a in jnp.split(qkv, 3, axis=-1))
        k, v = heads_first(k), heads_first(v)
        if layer_cache is not None:
            layer_cache = update_kv_cache(layer_cache, k, v, index)
            k, v = (a.astype(dt) for a in layer_cache)
        out = grouped_attention(q, k, v, mask).reshape(b, t, c.hidden_size)
        return Conv1D(c.hidden_size, dt, name="c_proj")(out), layer_cache


class GPT2MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c, dt = self.config, compute_dtype(self.config)
        h = ACTIVATION_FNS[c.activation](Conv1D(c.intermediate_size, dt, name="c_fc")(x))
        return Conv1D(c.hidden_size, dt, name="c_proj")(h)


def layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.norm_eps, dtype=compute_dtype(config), param_dtype=jnp.float32,
        use_fast_variance=False, name=name,
    )


class GPT2Block(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, rope, mask, layer_cache, index):
        c = self.config
        h, layer_cache = GPT2Attention(c, name="attn")(layer_norm(c, "ln_1")(x), rope, mask, layer_cache, index)
        x = x + h
        return x + GPT2MLP(c, name="mlp")(layer_norm(c, "ln_2")(x)), layer_cache


# (torch module, logical axes of its [out, in] kernel)
_PROJECTIONS = (("attn.c_attn", ("qkv", "embed")), ("attn.c_proj", ("embed", "heads")),
                ("mlp.c_fc", ("mlp", "embed")), ("mlp.c_proj", ("embed", "mlp")))

KEY_MAP: tuple[KeyMapping, ...] = (
    KeyMapping("transformer.wte.weight", "transformer/wte/embedding", axes=("vocab", "embed")),
    KeyMapping("transformer.wpe.weight", "transformer/wpe/embedding", axes=("positions", "embed")),
    *(KeyMapping(f"transformer.h.{{i}}.{ln}.weight", f"transformer/h/{{i}}/{ln}/scale") for ln in ("ln_1", "ln_2")),
    *(KeyMapping(f"transformer.h.{{i}}.{ln}.bias", f"transformer/h/{{i}}/{ln}/bias") for ln in ("ln_1", "ln_2")),
    *(KeyMapping(f"transformer.h.{{i}}.{m}.weight", f"transformer/h/{{i}}/{m.replace('.', '/')}/kernel", "transpose", axes=axes)
      for m, axes in _PROJECTIONS),
    *(KeyMapping(f"transformer.h.{{i}}.{m}.bias", f"transformer/h/{{i}}/{m.replace('.', '/')}/bias", axes=REPLICATED)
      for m, _ in _PROJECTIONS),
    KeyMapping("transformer.ln_f.weight", "transformer/ln_f/scale"),
    KeyMapping("transformer.ln_f.bias", "transformer/ln_f/bias"),
    KeyMapping("lm_head.weight", "lm_head/kernel", "transpose", when=lambda c: not c.tie_word_embeddings,
               axes=("embed", "vocab")),
)

GPT2 = register_family(ModelFamily(
    name="gpt2",
    architectures={"gpt2": HfArchitectures("GPT2LMHeadModel", "GPT2ForSequenceClassification")},
    read_hf=read_hf,
    write_hf=write_hf,
    block=GPT2Block,
    final_norm=layer_norm,
    names=ModuleNames(backbone="transformer", embedding="wte", blocks="h", final_norm="ln_f", positions="wpe"),
    key_map=KEY_MAP,
))
