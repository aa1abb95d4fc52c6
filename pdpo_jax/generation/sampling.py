"""Sampling strategies: small frozen dataclasses with one method, `choose(logits, key) -> token ids`.

A strategy is a value, so it can be hashed into the jit cache and written into a record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from pdpo_jax.backend_forms import by_backend

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
    with some positive weight): `inverse_cdf_draw` on CPU, `categorical_draw` on TPU and GPU."""
    return by_backend(weights, key, cpu_tuned=inverse_cdf_draw, textbook=categorical_draw)


def inverse_cdf_draw(weights: jax.Array, key: jax.Array) -> jax.Array:
    """`draw` by inverting the cumulative sum at one uniform draw per row.

    `jax.random.categorical` needs a Gumbel draw per vocabulary entry, which costs more than the
    model's own decode step on CPU at a 49k vocabulary; this needs one number per row.
    """
    cumulative = jnp.cumsum(weights.astype(jnp.float32), axis=-1)
    target = jax.random.uniform(key, weights.shape[:-1] + (1,)) * cumulative[..., -1:]
    index = jnp.sum(cumulative <= target, axis=-1)  # the first entry whose cumulative sum passes target
    entries = jnp.arange(weights.shape[-1], dtype=jnp.int32)
    last_possible = jnp.max(jnp.where(weights > 0, entries, 0), axis=-1)  # guards a target rounded up to the total
    return jnp.minimum(index, last_possible).astype(jnp.int32)


def categorical_draw(weights: jax.Array, key: jax.Array) -> jax.Array:
    """`draw` as `jax.random.categorical` on the log-weights (a zero weight is log 0 = -inf: never drawn)."""
    return jax.random.categorical(key, jnp.log(weights.astype(jnp.float32)), axis=-1).astype(jnp.int32)


def first_argmax(logits: jax.Array) -> jax.Array:
    """argmax over the last axis, the first index on ties: `first_argmax_by_reductions` on CPU,
    `jnp.argmax` on TPU and GPU."""
    return by_backend(logits, cpu_tuned=first_argmax_by_reductions,
                      textbook=lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32))


def first_argmax_by_reductions(logits: jax.Array) -> jax.Array:
    """`first_argmax` as two plain reductions; XLA's CPU argmax (one reduction over (value, index)
    pairs) is several times slower on large vocabularies."""
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
    top token always is). On TPU and GPU the vocabulary is sorted to rank the tokens. On CPU it is
    not (XLA's CPU sort of a large vocabulary costs more than a model step): when the
    NUCLEUS_CANDIDATES most likely tokens of every row already hold `p`, the nucleus lies among
    them and the draw is made there; otherwise the nucleus is found over the whole vocabulary by
    bisecting on the smallest kept probability.
    """

    p: float = 0.9
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check_temperature(self.temperature)
        if not 0 < self.p <= 1:
            raise ValueError(f"TopP.p must be in (0, 1], got {self.p!r}")

    def choose(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        probs = jax.nn.softmax(logits.astype(jnp.float32) / self.temperature, axis=-1)
        return by_backend(probs, key, cpu_tuned=self.draw_without_sorting, textbook=self.draw_by_sorting)

    def draw_without_sorting(self, probs: jax.Array, key: jax.Array) -> jax.Array:
        top_probs, top_ids = jax.lax.top_k(probs, min(NUCLEUS_CANDIDATES, probs.shape[-1]))

        def among_candidates():
            choice = inverse_cdf_draw(ranked_nucleus(top_probs, self.p), key)
            return jnp.take_along_axis(top_ids, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)

        def over_vocabulary():
            return inverse_cdf_draw(jnp.where(probs >= nucleus_threshold(probs, self.p), probs, 0.0), key)

        return jax.lax.cond(jnp.all(jnp.sum(top_probs, axis=-1) >= self.p), among_candidates, over_vocabulary)

    def draw_by_sorting(self, probs: jax.Array, key: jax.Array) -> jax.Array:
        order = jnp.argsort(probs, axis=-1, descending=True)  # stable: ties ranked by index, as top_k ranks them
        choice = categorical_draw(ranked_nucleus(jnp.take_along_axis(probs, order, axis=-1), self.p), key)
        return jnp.take_along_axis(order, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


def ranked_nucleus(ranked_probs: jax.Array, p: float) -> jax.Array:
    """`ranked_probs` (each row in descending order) with the tokens outside the nucleus set to 0."""
    mass_before = jnp.cumsum(ranked_probs, axis=-1) - ranked_probs
    return jnp.where(mass_before < p, ranked_probs, 0.0)


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
