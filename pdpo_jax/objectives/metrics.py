"""Metrics as `(sum, count)` pairs, the form every objective returns.

Sums and counts rather than means, so that summing them over gradient-accumulation micro-batches or
across hosts (`jax.lax.psum`, `merge_metrics`) and dividing once at the end gives the exact mean over
everything seen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Metric = tuple[jax.Array, jax.Array]
"""A metric as `(sum, count)`; its value is `sum / count`."""
Metrics = dict[str, Metric]


def detached(total: jax.Array, count: jax.Array) -> Metric:
    """A metric that gradients do not flow through."""
    return jax.lax.stop_gradient(total), jax.lax.stop_gradient(count)


def merge_metrics(a: Metrics, b: Metrics) -> Metrics:
    """Add two metric dicts pair-wise; a name present in only one is kept as is."""
    merged = dict(a)
    for name, (total, count) in b.items():
        if name in merged:
            merged[name] = (merged[name][0] + total, merged[name][1] + count)
        else:
            merged[name] = (total, count)
    return merged


def finalize_metrics(metrics: Metrics) -> dict[str, float]:
    """`{name: sum / count}` as Python floats; NaN where nothing was counted."""
    values = {}
    for name, (total, count) in metrics.items():
        count = float(count)
        values[name] = float(total) / count if count else float("nan")
    return values


def token_metrics(weights: jax.Array, per_token: dict[str, jax.Array]) -> Metrics:
    """`{name: (sum of values * weights, sum of weights)}` for per-token arrays `[B, T]`."""
    count = jnp.sum(weights)
    return {name: detached(jnp.sum(jnp.where(weights != 0, values * weights, 0.0)), count)
            for name, values in per_token.items()}
