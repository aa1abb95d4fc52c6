"""Jitted sampling with an explicit KV cache: one prefill, then a `lax.while_loop` of one-token steps.

Samplers are small frozen dataclasses with one method, `choose(logits, key) -> token ids`, so a
sampling strategy is a value that can be hashed into the jit cache and written into a record.
Prompts may be left- or right-padded: they are re-aligned to end in the same column (left padding)
with positions counted from the attention mask, so RoPE never sees the padding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from pdpo_jax.model import Decoder, ModelConfig, init_cache

PROMPT_BUCKET = 64  # prompt lengths are rounded up to a multiple of this to limit recompilation


class Sampler(Protocol):
    def choose(self, logits: jax.Array, key: jax.Array) -> jax.Array: ...


@dataclass(frozen=True)
class Greedy:
    def choose(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclass(frozen=True)
class Temperature:
    temperature: float = 1.0

    def choose(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        scaled = logits.astype(jnp.float32) / self.temperature
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


@dataclass(frozen=True)
class TopK:
    k: int = 50
    temperature: float = 1.0

    def choose(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        scaled = logits.astype(jnp.float32) / self.temperature
        kth_largest = jax.lax.top_k(scaled, self.k)[0][..., -1:]
        masked = jnp.where(scaled < kth_largest, -jnp.inf, scaled)
        return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


@dataclass(frozen=True)
class TopP:
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches `p`."""

    p: float = 0.9
    temperature: float = 1.0

    def choose(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        scaled = logits.astype(jnp.float32) / self.temperature
        sorted_logits = jnp.sort(scaled, axis=-1)[..., ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        # A token is kept when the mass strictly before it is below p (the top token always is).
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        kept = mass_before < self.p
        threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        masked = jnp.where(scaled < threshold, -jnp.inf, scaled)
        return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


def sampler_from_config(kind: str, *, temperature: float = 1.0, top_k: int = 50, top_p: float = 0.9) -> Sampler:
    if kind == "greedy":
        return Greedy()
    if kind == "temperature":
        return Temperature(temperature)
    if kind == "top_k":
        return TopK(top_k, temperature)
    if kind == "top_p":
        return TopP(top_p, temperature)
    raise ValueError(f"unknown sampler kind {kind!r}; expected greedy, temperature, top_k or top_p")


def sampler_description(sampler: Sampler) -> dict[str, Any]:
    return {"kind": type(sampler).__name__, **dataclasses.asdict(sampler)}


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray, pad_id: int, bucket: int = PROMPT_BUCKET):
    """Moves every prompt to the right edge (left padding) of a width rounded up to `bucket`."""
    input_ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask).astype(bool)
    lengths = mask.sum(axis=1)
    if (lengths == 0).any():
        raise ValueError(f"prompt rows {np.flatnonzero(lengths == 0).tolist()} are empty")
    width = int(-(-lengths.max() // bucket) * bucket)
    ids = np.full((input_ids.shape[0], width), pad_id, np.int32)
    valid = np.zeros((input_ids.shape[0], width), np.int32)
    for row in range(input_ids.shape[0]):
        tokens = input_ids[row][mask[row]]
        ids[row, width - len(tokens):] = tokens
        valid[row, width - len(tokens):] = 1
    return ids, valid


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampler", "eos_ids", "pad_id"))
def _generate_aligned(params, prompt_ids, prompt_valid, key, *, config: ModelConfig, max_new_tokens: int,
                      sampler: Sampler, eos_ids: tuple[int, ...], pad_id: int):
    decoder = Decoder(config)
    batch, width = prompt_ids.shape
    cache = init_cache(config, batch, width + max_new_tokens, dtype=jnp.dtype(config.dtype))
    positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache = decoder.apply({"params": params}, prompt_ids, positions, prompt_valid, cache=cache)
    next_logits = logits[:, -1, :]
    next_position = positions[:, -1] + 1
    eos = jnp.asarray(eos_ids, jnp.int32)

    def keep_going(state):
        step, _, _, _, finished, _ = state
        return (step < max_new_tokens) & ~jnp.all(finished)

    def one_token(state):
        step, cache, next_logits, tokens, finished, position = state
        token = sampler.choose(next_logits, jax.random.fold_in(key, step))
        token = jnp.where(finished, pad_id, token)
        tokens = tokens.at[:, step].set(token)
        finished = finished | jnp.isin(token, eos)
        logits, cache = decoder.apply(
            {"params": params}, token[:, None], position[:, None], jnp.ones((batch, 1), jnp.int32), cache=cache
        )
        return step + 1, cache, logits[:, -1, :], tokens, finished, position + 1

    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.int32(0), cache, next_logits, tokens, jnp.zeros((batch,), bool), next_position)
    return jax.lax.while_loop(keep_going, one_token, state)[3]


def generate(model, input_ids, attention_mask, *, max_new_tokens: int, sampler: Sampler | None = None,
             seed: int = 0) -> np.ndarray:
    """New token ids `[batch, max_new_tokens]` after each prompt, padded with the pad id after EOS.

    `model` is a `LoadedModel`; prompts may be left- or right-padded (`attention_mask` says which
    tokens are real). Greedy when `sampler` is None; the same seed reproduces the same sample.
    """
    config = model.config
    eos_ids = _eos_ids(model)
    pad_id = _pad_id(model, eos_ids)
    prompt_ids, prompt_valid = left_align(input_ids, attention_mask, pad_id)
    tokens = _generate_aligned(
        model.params, jnp.asarray(prompt_ids), jnp.asarray(prompt_valid), jax.random.PRNGKey(seed),
        config=config, max_new_tokens=int(max_new_tokens), sampler=sampler or Greedy(),
        eos_ids=eos_ids, pad_id=pad_id,
    )
    return np.asarray(tokens)


def _eos_ids(model) -> tuple[int, ...]:
    ids = model.config.eos_token_id
    ids = (ids,) if isinstance(ids, int) else tuple(ids or ())
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids = tuple(dict.fromkeys(ids + (int(tokenizer.eos_token_id),)))
    if not ids:
        raise ValueError(f"{model.path}: the model has no end-of-sequence token id to stop on")
    return ids


def _pad_id(model, eos_ids: tuple[int, ...]) -> int:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if model.config.pad_token_id is not None:
        return int(model.config.pad_token_id)
    return eos_ids[0]
