"""Jitted sampling with an explicit KV cache: one prefill, then a `lax.while_loop` of one-token steps.

Prompts may be left- or right-padded: they are re-aligned to end in the same column (left padding)
with positions counted from the attention mask, so RoPE never sees the padding. The aligned width
is rounded up to a few sizes per octave, so prompts of similar length share one compilation.
The strategy that picks each token is a sampler from `pdpo_jax.generation.sampling`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdpo_jax.generation.sampling import Greedy, Sampler
from pdpo_jax.model import Decoder, Model, ModelConfig, eos_ids, init_cache, pad_id, unembedding
from pdpo_jax.model.decoder import compute_dtype
from pdpo_jax.model.family import family_for
from pdpo_jax.parallel import BATCH_AXES, fit_spec, on_mesh, place_batch, rows_for_mesh, shard_params

MIN_PROMPT_BUCKET = 16
OCTAVE_SPLIT_BITS = 3  # 2**3 widths per octave: padding wastes under 1/4 of the prefill, typically ~1/16

# ----------------------------------------------------------------------------- prompt layout


def bucket_width(length: int) -> int:
    """`length` rounded up to a multiple of 1/8 of its octave (at least MIN_PROMPT_BUCKET)."""
    octave = (int(length) - 1).bit_length()  # 2**(octave-1) < length <= 2**octave
    step = max(MIN_PROMPT_BUCKET, 2 ** max(0, octave - OCTAVE_SPLIT_BITS))
    return -(-int(length) // step) * step


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray, pad_id: int, width: int | None = None):
    """Moves every prompt to the right edge (left padding) of `width` (default: the bucketed longest)."""
    input_ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask).astype(bool)
    if input_ids.ndim != 2 or mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {mask.shape} must be the same [batch, length]")
    lengths = mask.sum(axis=1)
    if (lengths == 0).any():
        raise ValueError(f"prompt rows {np.flatnonzero(lengths == 0).tolist()} are empty")
    width = bucket_width(int(lengths.max())) if width is None else width
    ids = np.full((input_ids.shape[0], width), pad_id, np.int32)
    valid = np.zeros((input_ids.shape[0], width), np.int32)
    for row in range(input_ids.shape[0]):
        tokens = input_ids[row][mask[row]]
        ids[row, width - len(tokens):] = tokens
        valid[row, width - len(tokens):] = 1
    return ids, valid


# ----------------------------------------------------------------------------- the jitted loop


def last_token_logits(hidden: jax.Array, head: jax.Array) -> jax.Array:
    """fp32 [batch, vocab] for hidden [batch, hidden] and the fp32 unembedding `head` [hidden, vocab].

    Sampling projects onto the vocabulary in fp32 whatever the compute dtype: the samplers want
    fp32 logits, and XLA's CPU bf16 matmul for a few rows is ~3x slower than the fp32 one.
    """
    return jnp.matmul(hidden.astype(jnp.float32), head)


def compute_params(params: Any, config: ModelConfig) -> Any:
    """The parameters in the compute dtype. Every layer casts its weights itself; casting once
    before the token loop keeps the casts (and, in bf16, half of the weight traffic) out of it."""
    dtype = compute_dtype(config)
    return jax.tree.map(lambda w: w.astype(dtype) if jnp.issubdtype(w.dtype, jnp.floating) else w, params)


def cache_specs(config: ModelConfig) -> dict:
    """PartitionSpecs of `init_cache`'s tree: keys and values split over the batch axes and their
    kv heads over "tensor" (as the k/v projections are), the id arrays over the batch axes; a
    scanned decoder's stacked keys and values keep their layer axis whole."""
    kv = PartitionSpec(BATCH_AXES, "tensor", None, None)
    ids = PartitionSpec(BATCH_AXES, None)
    if config.scan_layers:  # one array with a leading, unsplit layer axis
        layers = PartitionSpec(None, *kv)
        return {"k": layers, "v": layers, "positions": ids, "segment_ids": ids, "branch_ids": ids,
                "index": PartitionSpec()}
    return {"k": [kv] * config.num_layers, "v": [kv] * config.num_layers,
            "positions": ids, "segment_ids": ids, "branch_ids": ids, "index": PartitionSpec()}


def cache_shardings(config: ModelConfig, mesh: Mesh, batch: int, length: int) -> dict:
    """NamedShardings of a `[batch, length]` cache on `mesh`; an axis that does not divide its
    dimension (2 kv heads on tensor=4) leaves that dimension replicated."""
    shapes = jax.eval_shape(lambda: init_cache(config, batch, length, dtype=jnp.dtype(config.dtype)))
    return jax.tree.map(lambda spec, leaf: NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh)),
                        cache_specs(config), shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def constrain(tree: Any, shardings: Any) -> Any:
    """`tree` held to `shardings` (a matching tree of NamedShardings) inside jit; None: as it is."""
    if shardings is None:
        return tree
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)


def prefill(params, prompt_ids, prompt_valid, cache, *, config: ModelConfig):
    """Runs the left-aligned prompts through the model into `cache`: (fp32 logits of the next
    token `[batch, vocab]`, cache). `params` as `compute_params` returns them."""
    positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0).astype(jnp.int32)
    hidden, cache = Decoder(config).apply({"params": params}, prompt_ids, positions, prompt_valid, cache=cache,
                                          return_hidden=True)
    return last_token_logits(hidden[:, -1], unembedding(params, config).astype(jnp.float32)), cache


def decode_step(params, token, position, cache, *, config: ModelConfig):
    """One token per row (`token`, `position`: `[batch]`) into `cache`: (next-token logits, cache)."""
    ones = jnp.ones((token.shape[0], 1), jnp.int32)
    hidden, cache = Decoder(config).apply({"params": params}, token[:, None], position[:, None], ones, cache=cache,
                                          return_hidden=True)
    return last_token_logits(hidden[:, -1], unembedding(params, config).astype(jnp.float32)), cache


def sample_tokens(params, logits, cache, next_position, key, *, config: ModelConfig, max_new_tokens: int,
                  sampler: Sampler, eos_ids: tuple[int, ...], pad_id: int, cache_shardings: Any = None):
    """The token loop after a prefill: one token per row per step (`lax.while_loop`) until every
    row has sampled an end of sequence or `max_new_tokens` are out. `logits` `[batch, vocab]` are
    the prefill's next-token logits, `next_position` `[batch]` the position of each row's first
    new token; new tokens are written at the cache's `index`. Returns `[batch, max_new_tokens]`,
    the pad id after each row's end of sequence."""
    batch = logits.shape[0]
    eos = jnp.asarray(eos_ids, jnp.int32)

    def keep_going(state):
        step, finished = state[0], state[4]
        return (step < max_new_tokens) & ~jnp.all(finished)

    def one_token(state):
        step, cache, logits, tokens, finished, position = state
        token = sampler.choose(logits, jax.random.fold_in(key, step))
        token = jnp.where(finished, pad_id, token)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        finished = finished | jnp.isin(token, eos)
        logits, cache = decode_step(params, token, position, cache, config=config)
        return step + 1, constrain(cache, cache_shardings), logits, tokens, finished, position + 1

    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.int32(0), cache, logits, tokens, jnp.zeros((batch,), bool), next_position.astype(jnp.int32))
    _, _, _, tokens, _, _ = jax.lax.while_loop(keep_going, one_token, state)
    return tokens


def replicated_tokens(tokens: jax.Array, mesh: Mesh | None) -> jax.Array:
    """The tokens on every device, so every process of a multi-host run reads every row."""
    return tokens if mesh is None else jax.lax.with_sharding_constraint(tokens, NamedSharding(mesh, PartitionSpec()))


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampler", "eos_ids", "pad_id", "mesh"))
def _decode(params, prompt_ids, prompt_valid, key, *, config: ModelConfig, max_new_tokens: int, sampler: Sampler,
            eos_ids: tuple[int, ...], pad_id: int, mesh: Mesh | None = None):
    """Sampled tokens `[batch, max_new_tokens]`, the pad id after each row's end of sequence."""
    batch, width = prompt_ids.shape
    params = compute_params(params, config)
    shardings = None if mesh is None else cache_shardings(config, mesh, batch, width + max_new_tokens)
    cache = constrain(init_cache(config, batch, width + max_new_tokens, dtype=jnp.dtype(config.dtype)), shardings)
    logits, cache = prefill(params, prompt_ids, prompt_valid, cache, config=config)
    next_position = jnp.sum(prompt_valid, axis=1).astype(jnp.int32)
    tokens = sample_tokens(params, logits, cache, next_position, key, config=config, max_new_tokens=max_new_tokens,
                           sampler=sampler, eos_ids=eos_ids, pad_id=pad_id, cache_shardings=shardings)
    return replicated_tokens(tokens, mesh)


def check_new_tokens(model: Model, longest_prompt: int, max_new_tokens: int) -> None:
    """Refuses a token budget below one, or past a learned-position model's last position."""
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    longest = int(longest_prompt) + int(max_new_tokens)
    if family_for(model.config).learned_positions and longest > model.config.max_position_embeddings:
        raise ValueError(f"{model.path}: prompt + max_new_tokens = {longest} tokens exceeds the model's "
                         f"{model.config.max_position_embeddings} learned positions")


def params_on(model: Model, mesh: Mesh | None) -> Any:
    """The model's parameters, placed on `mesh` by the partition rules unless they already are."""
    if mesh is None or on_mesh(model.params, mesh):
        return model.params
    return shard_params(model.params, mesh)


# ----------------------------------------------------------------------------- public entry point


def generate(model: Model, input_ids, attention_mask, *, max_new_tokens: int, sampler: Sampler | None = None,
             seed: int = 0, mesh: Mesh | None = None) -> np.ndarray:
    """New token ids `[batch, max_new_tokens]` after each prompt, padded with the pad id after EOS.

    Prompts may be left- or right-padded (`attention_mask` says which tokens are real). Greedy
    when `sampler` is None; the same seed reproduces the same sample. With `mesh`, rows are split
    over its ("data", "fsdp") axes and parameters placed by `pdpo_jax.parallel`'s rules; the
    tokens are the same as on one device.
    """
    config = model.config
    stop_ids = eos_ids(model)
    pad = pad_id(model)
    prompt_ids, prompt_valid = left_align(input_ids, attention_mask, pad)
    check_new_tokens(model, int(prompt_valid.sum(axis=1).max()), max_new_tokens)
    batch = prompt_ids.shape[0]
    params = params_on(model, mesh)
    if mesh is not None:
        extra = rows_for_mesh(batch, mesh) - batch  # filler rows (copies of row 0) so the batch splits evenly
        prompt_ids = np.concatenate([prompt_ids, np.repeat(prompt_ids[:1], extra, axis=0)])
        prompt_valid = np.concatenate([prompt_valid, np.repeat(prompt_valid[:1], extra, axis=0)])
        prompt_ids, prompt_valid = place_batch((prompt_ids, prompt_valid), mesh)
    tokens = _decode(params, jnp.asarray(prompt_ids), jnp.asarray(prompt_valid), jax.random.PRNGKey(seed),
                     config=config, max_new_tokens=int(max_new_tokens), sampler=sampler or Greedy(),
                     eos_ids=stop_ids, pad_id=pad, mesh=mesh)
    return np.asarray(tokens)[:batch]
