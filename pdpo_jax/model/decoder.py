"""One Flax Linen decoder for every registered model family, and the layers the families build on.

The decoder is the same for all: embeddings, the family's block repeated (or scanned), the
family's final norm, the LM head; each family (`pdpo_jax.model.families`) supplies its block and
the names of its modules. Parameter names mirror the Hugging Face Flax models
(FlaxGPT2LMHeadModel, FlaxLlamaForCausalLM), so a Hub `flax_model.msgpack` loads as is. The
attention mask is built once per call from segment, branch and position ids (docs/design.md, "The
model call"); the KV cache is a plain pytree passed in and returned.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pdpo_jax.backend_forms import by_backend
from pdpo_jax.model.config import ModelConfig
from pdpo_jax.model.family import family_for
from pdpo_jax.projection import matmul_last_axis
from pdpo_jax.parallel import STACKED_LAYERS

Array = jax.Array
# finite, so a fully masked (padding) row softmaxes to a uniform row instead of NaN
MASK_VALUE = -1e30

ACTIVATION_FNS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def compute_dtype(config: ModelConfig) -> Any:
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


# ----------------------------------------------------------------------------- mask and rope


def attention_mask(
    q_segments: Array, q_branches: Array, q_positions: Array, q_slots: Array,
    kv_segments: Array, kv_branches: Array, kv_positions: Array, kv_slots: Array,
    sliding_window: int | None,
) -> Array:
    """bool [batch, q_len, kv_len]: the rule of docs/design.md, from ids alone.

    A branch forks off the trunk at its first token's position: it sees the trunk tokens before
    that position and its own tokens, never the trunk's later tokens (a dialogue tree's gold
    continuation) or another branch.
    """
    same_segment = (q_segments[:, :, None] == kv_segments[:, None, :]) & (q_segments[:, :, None] != 0)
    causal = kv_slots[:, None, :] <= q_slots[:, :, None]
    q_branch, kv_branch = q_branches[:, :, None], kv_branches[:, None, :]
    own_branch = (kv_branch == q_branch) & (q_branch != 0) & same_segment
    fork = jnp.min(jnp.where(own_branch, kv_positions[:, None, :], jnp.iinfo(jnp.int32).max), axis=-1)
    trunk_before_fork = (kv_branch == 0) & (kv_positions[:, None, :] < fork[:, :, None])
    mask = same_segment & causal & (trunk_before_fork | (kv_branch == q_branch))
    if sliding_window is not None:
        mask &= (q_positions[:, :, None] - kv_positions[:, None, :]) < sliding_window
    return mask


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """inv_freq as transformers computes it (fp32), with linear / llama3 scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return (inv_freq / factor).astype(np.float32)
    # llama3: low frequencies divided by factor, high kept, smooth blend in between
    old_len = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: Array, config: ModelConfig) -> tuple[Array, Array]:
    """cos, sin [batch, length, head_dim // 2] in fp32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(config))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """HF half-rotation: x * cos + rotate_half(x) * sin on [batch, length, heads, head_dim]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def grouped_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """q [b,t,heads,d], k/v [b,kv_heads,s,d] (the cache's layout), mask [b,t,s] -> [b,t,heads,d];
    no key/value repeat.

    The query heads sharing a key/value head are stacked along the query axis, so both products
    are plain batched matmuls over (batch, kv head): about twice as fast on XLA's CPU backend as
    contracting a 5-D layout, forward and backward.
    """
    b, t, heads, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q = q.reshape(b, t, kv_heads, group, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, group * t, d)
    if t == 1 and q.dtype == jnp.float32:
        scores = by_backend(q, k, cpu_tuned=_scores_by_multiply_and_sum, textbook=_scores_by_matmul)
    else:
        scores = _scores_by_matmul(q, k)
    scores = scores * (1.0 / np.sqrt(d))
    scores = jnp.where(mask[:, None, None, :, :], scores.reshape(b, kv_heads, group, t, -1), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv_heads, group * t, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)
    out = out.reshape(b, kv_heads, group, t, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, heads, d)


def _scores_by_matmul(q: Array, k: Array) -> Array:
    """q [b,kv_heads,queries,d] . k [b,kv_heads,s,d] -> fp32 [b,kv_heads,queries,s]."""
    return jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)


def _scores_by_multiply_and_sum(q: Array, k: Array) -> Array:
    """`_scores_by_matmul` for fp32 q and k. One fp32 decode token makes the product a matrix-vector
    product per (row, kv head), which XLA's CPU backend runs faster as a fused multiply-and-sum
    (decode step 108 -> 91 ms on the bundled model); in bf16 the batched matmul is as fast and
    keeps fp32 accumulation."""
    return jnp.sum(q[:, :, :, None, :] * k[:, :, None, :, :], axis=-1)


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * normed.astype(self.dtype)


class Conv1D(nn.Module):
    """GPT-2's projection as FlaxGPT2 stores it: kernel [out_features, in_features]."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.normal(0.02), (self.features, x.shape[-1]), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = matmul_last_axis(x.astype(self.dtype), kernel.astype(self.dtype).T, preferred_element_type=jnp.float32)
        y = y.astype(self.dtype)
        return y + bias.astype(self.dtype)


class Dense(nn.Module):
    """`nn.Dense` with the same parameters (kernel [in, out], bias [out], fp32), computed in `dtype`."""

    features: int
    use_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), jnp.float32)
        y = matmul_last_axis(x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=jnp.float32)
        y = y.astype(self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


def dense(features: int, use_bias: bool, dtype: Any, name: str) -> Dense:
    return Dense(features, use_bias, dtype, name=name)


def heads_first(x: Array) -> Array:
    """[b, t, heads, d] -> [b, heads, t, d]: keys and values as the cache and attention hold them."""
    return x.transpose(0, 2, 1, 3)


def write_at(old: Array, new: Array, index: Array, axis: int) -> Array:
    """`new` written into `old` from `index` on along `axis` (axis 0 is the batch): one start for
    every row (a scalar), or one per row (`[batch]`: serving's slots each write at their own column)."""
    new = new.astype(old.dtype)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice_in_dim(old, new, index, axis)
    return jax.vmap(lambda row, part, at: jax.lax.dynamic_update_slice_in_dim(row, part, at, axis - 1))(old, new, index)


def update_kv_cache(layer_cache: tuple[Array, Array], k: Array, v: Array, index: Array) -> tuple[Array, Array]:
    cached_k, cached_v = layer_cache  # [batch, kv_heads, length, head_dim]
    return write_at(cached_k, k, index, 2), write_at(cached_v, v, index, 2)


STACKED = STACKED_LAYERS


class BlockStack(nn.Module):
    """Blocks named "0", "1", ... like HF Flax's layer collections (model/layers/0, transformer/h/0);
    with `config.scan_layers` one block scanned `num_layers` times instead (model/layers/stacked,
    every parameter and the KV cache with a leading layer axis), so XLA compiles a single layer."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, rope, mask, layer_caches, index):
        block_cls = family_for(self.config).block
        if self.config.scan_layers:
            if self.config.remat:
                block_cls = nn.remat(block_cls, prevent_cse=False)  # scan already keeps the recompute apart
            scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=self.config.num_layers)
            return scanned(self.config, name=STACKED)(x, rope, mask, layer_caches, index)
        if self.config.remat:
            block_cls = nn.remat(block_cls)
        new_caches = []
        for i in range(self.config.num_layers):
            layer_cache = None if layer_caches is None else layer_caches[i]
            x, layer_cache = block_cls(self.config, name=str(i))(x, rope, mask, layer_cache, index)
            new_caches.append(layer_cache)
        return x, new_caches


class Backbone(nn.Module):
    """Embeddings, blocks and final norm: HF's `model` (Llama) or `transformer` (GPT-2)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids, positions, mask, layer_caches, index):
        c, dt = self.config, compute_dtype(self.config)
        family = family_for(c)
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=jnp.float32,
                         embedding_init=nn.initializers.normal(0.02), name=family.names.embedding)
        x = embed(input_ids)
        rope = None
        if family.learned_positions:
            x = x + nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=dt, param_dtype=jnp.float32,
                             embedding_init=nn.initializers.normal(0.01), name=family.names.positions)(positions)
        else:
            rope = rope_tables(positions, c)
        x, layer_caches = BlockStack(c, name=block_stack_name(c))(x, rope, mask, layer_caches, index)
        x = family.final_norm(c, family.names.final_norm)(x)
        return x, layer_caches, embed.embedding


def backbone_name(config: ModelConfig) -> str:
    return family_for(config).names.backbone


def block_stack_name(config: ModelConfig) -> str:
    """The block collection inside the backbone: GPT-2's `h`, Llama's `layers`."""
    return family_for(config).names.blocks


def embedding_path(config: ModelConfig) -> tuple[str, str, str]:
    return (backbone_name(config), family_for(config).names.embedding, "embedding")


class Decoder(nn.Module):
    """`logits, cache = apply({"params": p}, input_ids, positions, segment_ids, branch_ids, cache)`.

    Logits are fp32 [batch, length, vocab]; with `return_hidden=True` the final-norm hidden states
    (compute dtype) come back instead, for chunked log-probs against `unembedding(params, config)`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids, positions, segment_ids, branch_ids=None, cache=None, return_hidden=False):
        c = self.config
        batch, length = input_ids.shape
        positions = positions.astype(jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)
        branch_ids = jnp.zeros_like(segment_ids) if branch_ids is None else branch_ids.astype(jnp.int32)
        q_slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        if cache is None:
            kv = (segment_ids, branch_ids, positions, q_slots)
            layer_caches, index = None, None
        else:
            index = cache["index"].astype(jnp.int32)
            cache = write_cache_ids(cache, positions, segment_ids, branch_ids, index)
            max_len = cache["segment_ids"].shape[1]
            kv_slots = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))
            kv = (cache["segment_ids"], cache["branch_ids"], cache["positions"], kv_slots)
            q_slots = q_slots + (index[:, None] if index.ndim else index)
            layer_caches = (cache["k"], cache["v"]) if c.scan_layers else list(zip(cache["k"], cache["v"]))
        mask = attention_mask(segment_ids, branch_ids, positions, q_slots, *kv, c.sliding_window)
        hidden, layer_caches, table = Backbone(c, name=backbone_name(c))(input_ids, positions, mask, layer_caches, index)
        if cache is not None:
            k, v = layer_caches if c.scan_layers else ([k for k, _ in layer_caches], [v for _, v in layer_caches])
            cache = dict(cache, k=k, v=v, index=index + length)
        if return_hidden:
            return hidden, cache
        if c.tie_word_embeddings:
            logits = matmul_last_axis(hidden, table.astype(hidden.dtype).T, preferred_element_type=jnp.float32)
        else:
            logits = LMHead(c, name="lm_head")(hidden)
        return logits.astype(jnp.float32), cache


class LMHead(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, hidden):
        c = self.config
        kernel = self.param("kernel", nn.initializers.normal(0.02), (c.hidden_size, c.vocab_size), jnp.float32)
        return matmul_last_axis(hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)


def write_cache_ids(cache: dict, positions: Array, segment_ids: Array, branch_ids: Array, index: Array) -> dict:
    return dict(
        cache,
        positions=write_at(cache["positions"], positions, index, 1),
        segment_ids=write_at(cache["segment_ids"], segment_ids, index, 1),
        branch_ids=write_at(cache["branch_ids"], branch_ids, index, 1),
    )


def init_cache(config: ModelConfig, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> dict:
    """An empty KV cache: segment_ids 0 marks an empty slot; `index` is the next slot to write (a
    scalar here; a `[batch_size]` index, one per row, works as well).
    Keys and values are a list of `[batch, kv_heads, max_length, head_dim]` arrays, one per layer,
    or with `config.scan_layers` one array with a leading layer axis."""
    shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
    ids = jnp.zeros((batch_size, max_length), jnp.int32)
    if config.scan_layers:
        k = v = jnp.zeros((config.num_layers, *shape), dtype)
    else:
        k, v = ([jnp.zeros(shape, dtype) for _ in range(config.num_layers)] for _ in range(2))
    return {
        "k": k,
        "v": v,
        "positions": ids,
        "segment_ids": ids,
        "branch_ids": ids,
        "index": jnp.zeros((), jnp.int32),
    }


def unembedding(params: Any, config: ModelConfig) -> Array:
    """[hidden, vocab]: `hidden @ unembedding(...)` gives the logits (tied -> embedding.T)."""
    if config.tie_word_embeddings:
        backbone, table, leaf = embedding_path(config)
        return params[backbone][table][leaf].T
    return params["lm_head"]["kernel"]


def init_params(config: ModelConfig, rng: Array | int = 0) -> Any:
    """Random parameters of the right shapes (fp32), for tests and fresh models."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    ids = jnp.zeros((1, 1), jnp.int32)
    return Decoder(config).init(rng, ids, ids, jnp.ones_like(ids))["params"]


def param_shapes(config: ModelConfig) -> Any:
    """The parameter tree as ShapeDtypeStructs, without allocating anything."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda i: Decoder(config).init(jax.random.PRNGKey(0), i, i, i), ids)["params"]
