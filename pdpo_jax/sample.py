"""Jitted sampling with an explicit KV cache: one prefill, then a `lax.while_loop` of one-token steps.

Samplers are small frozen dataclasses with one method, `choose(logits, key) -> token ids`, so a
sampling strategy is a value that can be hashed into the jit cache and written into a record.
Prompts may be left- or right-padded: they are re-aligned to end in the same column (left padding)
with positions counted from the attention mask, so RoPE never sees the padding. The aligned width
is rounded up to a few sizes per octave, so prompts of similar length share one compilation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdpo_jax.model import Decoder, ModelConfig, init_cache, unembedding
from pdpo_jax.model.decoder import compute_dtype
from pdpo_jax.parallel import BATCH_AXES, batch_sharding, shard_params

MIN_PROMPT_BUCKET = 16
OCTAVE_SPLIT_BITS = 3  # 2**3 widths per octave: padding wastes under 1/4 of the prefill, typically ~1/16
NUCLEUS_CANDIDATES = 256  # top-p draws among this many most likely tokens when they hold p


class Sampler(Protocol):
    def choose(self, logits: jax.Array, key: jax.Array) -> jax.Array: ...


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use Greedy() for argmax), got {temperature!r}")


@dataclass(frozen=True)
class Greedy:
    def choose(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        return first_argmax(logits)


def draw(weights: jax.Array, key: jax.Array) -> jax.Array:
    """One index per row with probability proportional to `weights` `[batch, n]` (>= 0, each row
    with some positive weight), by inverting the cumulative sum at one uniform draw per row.

    `jax.random.categorical` needs a Gumbel draw per vocabulary entry, which costs more than the
    model's own decode step on CPU at a 49k vocabulary; this needs one number per row.
    """
    cumulative = jnp.cumsum(weights.astype(jnp.float32), axis=-1)
    target = jax.random.uniform(key, weights.shape[:-1] + (1,)) * cumulative[..., -1:]
    index = jnp.sum(cumulative <= target, axis=-1)  # the first entry whose cumulative sum passes target
    entries = jnp.arange(weights.shape[-1], dtype=jnp.int32)
    last_possible = jnp.max(jnp.where(weights > 0, entries, 0), axis=-1)  # guards a target rounded up to the total
    return jnp.minimum(index, last_possible).astype(jnp.int32)


def first_argmax(logits: jax.Array) -> jax.Array:
    """argmax over the last axis (first index on ties) as two plain reductions; XLA's CPU argmax
    (one reduction over (value, index) pairs) is several times slower on large vocabularies."""
    largest = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits == largest, index, logits.shape[-1]), axis=-1)


@dataclass(frozen=True)
class Temperature:
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check_temperature(self.temperature)

    def choose(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        return draw(jax.nn.softmax(logits.astype(jnp.float32) / self.temperature, axis=-1), key)


@dataclass(frozen=True)
class TopK:
    k: int = 50
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check_temperature(self.temperature)
        if self.k < 1:
            raise ValueError(f"TopK.k must be >= 1, got {self.k!r}")

    def choose(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        scaled = logits.astype(jnp.float32) / self.temperature
        top_logits, top_ids = jax.lax.top_k(scaled, min(self.k, scaled.shape[-1]))
        choice = draw(jax.nn.softmax(top_logits, axis=-1), key)
        return jnp.take_along_axis(top_ids, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


@dataclass(frozen=True)
class TopP:
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches `p`.

    A token is in the nucleus when the mass of the tokens ranked before it is below `p` (so the
    top token always is). When the NUCLEUS_CANDIDATES most likely tokens of every row already hold
    `p`, the nucleus lies among them and the draw is made there; otherwise the nucleus is found
    over the whole vocabulary without sorting it (XLA's CPU sort of a large vocabulary costs more
    than a model step), by bisecting on the smallest kept probability.
    """

    p: float = 0.9
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check_temperature(self.temperature)
        if not 0 < self.p <= 1:
            raise ValueError(f"TopP.p must be in (0, 1], got {self.p!r}")

    def choose(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        scaled = logits.astype(jnp.float32) / self.temperature
        probs = jax.nn.softmax(scaled, axis=-1)
        top_probs, top_ids = jax.lax.top_k(probs, min(NUCLEUS_CANDIDATES, probs.shape[-1]))

        def among_candidates():
            mass_before = jnp.cumsum(top_probs, axis=-1) - top_probs
            choice = draw(jnp.where(mass_before < self.p, top_probs, 0.0), key)
            return jnp.take_along_axis(top_ids, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)

        def over_vocabulary():
            return draw(jnp.where(probs >= nucleus_threshold(probs, self.p), probs, 0.0), key)

        return jax.lax.cond(jnp.all(jnp.sum(top_probs, axis=-1) >= self.p), among_candidates, over_vocabulary)


def nucleus_threshold(probs: jax.Array, p: float) -> jax.Array:
    """[..., 1]: the largest t such that the tokens with probability >= t hold at least `p`.

    Those tokens are exactly the nucleus. Non-negative float32 values order like their int32 bit
    patterns, so 31 halvings of the bit range [0, bits(1.0)] find t exactly, each one pass over
    the vocabulary.
    """
    bits = jax.lax.bitcast_convert_type(probs.astype(jnp.float32), jnp.int32)
    low = jnp.zeros(probs.shape[:-1] + (1,), jnp.int32)  # invariant: mass(>= low) >= p > mass(>= high)
    high = jnp.full_like(low, int(np.float32(1.0).view(np.int32)) + 1)

    def halve(_, bounds):
        low, high = bounds
        middle = low + (high - low) // 2
        enough = jnp.sum(jnp.where(bits >= middle, probs, 0.0), axis=-1, keepdims=True) >= p
        return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

    low, _ = jax.lax.fori_loop(0, 31, halve, (low, high))
    return jax.lax.bitcast_convert_type(low, jnp.float32)


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


def _constrain_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Keeps every per-row array split over the batch axes (scalars replicated)."""
    if mesh is None:
        return tree

    def constrain(x):
        spec = PartitionSpec(BATCH_AXES) if x.ndim else PartitionSpec()
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(constrain, tree)


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampler", "eos_ids", "pad_id", "keep_logits", "mesh"))
def _decode(params, prompt_ids, prompt_valid, key, *, config: ModelConfig, max_new_tokens: int, sampler: Sampler,
            eos_ids: tuple[int, ...], pad_id: int, keep_logits: bool = False, mesh: Mesh | None = None):
    """tokens [batch, max_new_tokens] (and, with keep_logits, the fp32 logits each was chosen from)."""
    decoder = Decoder(config)
    batch, width = prompt_ids.shape
    head = unembedding(params, config).astype(jnp.float32)
    # Every layer casts its weights to the compute dtype; doing it once here keeps the casts (and,
    # in bf16, half of the weight traffic) out of the per-token loop. The values are unchanged.
    params = jax.tree.map(lambda w: w.astype(compute_dtype(config)) if jnp.issubdtype(w.dtype, jnp.floating) else w,
                          params)
    cache = _constrain_batch(init_cache(config, batch, width + max_new_tokens, dtype=jnp.dtype(config.dtype)), mesh)
    positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0).astype(jnp.int32)
    hidden, cache = decoder.apply({"params": params}, prompt_ids, positions, prompt_valid, cache=cache,
                                  return_hidden=True)
    logits = last_token_logits(hidden[:, -1], head)
    eos = jnp.asarray(eos_ids, jnp.int32)
    ones = jnp.ones((batch, 1), jnp.int32)

    def keep_going(state):
        step, finished = state[0], state[4]
        return (step < max_new_tokens) & ~jnp.all(finished)

    def one_token(state):
        step, cache, logits, tokens, finished, position, seen = state
        token = sampler.choose(logits, jax.random.fold_in(key, step))
        token = jnp.where(finished, pad_id, token)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        if keep_logits:
            seen = jax.lax.dynamic_update_slice(seen, logits[:, None, :], (0, step, 0))
        finished = finished | jnp.isin(token, eos)
        hidden, cache = decoder.apply({"params": params}, token[:, None], position[:, None], ones, cache=cache,
                                      return_hidden=True)
        logits = last_token_logits(hidden[:, -1], head)
        return step + 1, _constrain_batch(cache, mesh), logits, tokens, finished, position + 1, seen

    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    seen = jnp.zeros((batch, max_new_tokens, config.vocab_size) if keep_logits else (), jnp.float32)
    state = (jnp.int32(0), cache, logits, tokens, jnp.zeros((batch,), bool), positions[:, -1] + 1, seen)
    _, _, _, tokens, _, _, seen = jax.lax.while_loop(keep_going, one_token, state)
    return _constrain_batch((tokens, seen) if keep_logits else tokens, mesh)


# ----------------------------------------------------------------------------- public entry point


def generate(model, input_ids, attention_mask, *, max_new_tokens: int, sampler: Sampler | None = None,
             seed: int = 0, mesh: Mesh | None = None) -> np.ndarray:
    """New token ids `[batch, max_new_tokens]` after each prompt, padded with the pad id after EOS.

    `model` is a `LoadedModel`; prompts may be left- or right-padded (`attention_mask` says which
    tokens are real). Greedy when `sampler` is None; the same seed reproduces the same sample.
    With `mesh`, rows are split over its ("data", "fsdp") axes and parameters placed by
    `pdpo_jax.parallel`'s rules; the tokens are the same as on one device.
    """
    return _run(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
                mesh=mesh, keep_logits=False)


def _generate_with_step_logits(model, input_ids, attention_mask, *, max_new_tokens: int,
                               sampler: Sampler | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`generate`'s tokens plus the fp32 logits `[batch, max_new_tokens, vocab]` each was chosen from."""
    return _run(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
                mesh=None, keep_logits=True)


def _run(model, input_ids, attention_mask, *, max_new_tokens, sampler, seed, mesh, keep_logits):
    args, options, batch = _prepare(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, sampler=sampler,
                                    seed=seed, mesh=mesh, keep_logits=keep_logits)
    out = _decode(*args, **options)
    if keep_logits:
        return np.asarray(out[0])[:batch], np.asarray(out[1])[:batch]
    return np.asarray(out)[:batch]


def _prepare(model, input_ids, attention_mask, *, max_new_tokens, sampler, seed, mesh, keep_logits):
    """`_decode`'s arguments and static options for this request, and the number of real rows."""
    config = model.config
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    eos_ids = _eos_ids(model)
    pad_id = _pad_id(model, eos_ids)
    prompt_ids, prompt_valid = left_align(input_ids, attention_mask, pad_id)
    longest = int(prompt_valid.sum(axis=1).max()) + int(max_new_tokens)
    if config.family == "gpt2" and longest > config.max_position_embeddings:
        raise ValueError(f"{model.path}: prompt + max_new_tokens = {longest} tokens exceeds the model's "
                         f"{config.max_position_embeddings} learned positions")
    batch = prompt_ids.shape[0]
    params = model.params
    if mesh is not None:
        rows = int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))
        extra = -batch % rows  # filler rows (copies of row 0) so the batch splits evenly
        prompt_ids = np.concatenate([prompt_ids, np.repeat(prompt_ids[:1], extra, axis=0)])
        prompt_valid = np.concatenate([prompt_valid, np.repeat(prompt_valid[:1], extra, axis=0)])
        params = shard_params(params, mesh)
        prompt_ids, prompt_valid = jax.device_put((prompt_ids, prompt_valid), batch_sharding(mesh))
    args = (params, jnp.asarray(prompt_ids), jnp.asarray(prompt_valid), jax.random.PRNGKey(seed))
    options = dict(config=config, max_new_tokens=int(max_new_tokens), sampler=sampler or Greedy(), eos_ids=eos_ids,
                   pad_id=pad_id, keep_logits=keep_logits, mesh=mesh)
    return args, options, batch


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
