"""The projection every layer and the vocabulary head use: a matmul over the last axis, done in 2-D.

A `[batch, length, in] x [in, out]` contraction differentiates into a weight gradient that
contracts two axes at once; XLA's CPU backend runs that markedly slower (about 1.1 s of a 6 s
SFT step on the bundled model) than the same product on the `[batch * length, in]` view.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def matmul_last_axis(x: jax.Array, kernel: jax.Array, preferred_element_type: Any = None) -> jax.Array:
    """`x @ kernel` for `x` `[..., in]` and `kernel` `[in, out]` -> `[..., out]`."""
    flat = x.reshape(-1, x.shape[-1])
    out = jnp.matmul(flat, kernel, preferred_element_type=preferred_element_type)
    return out.reshape(x.shape[:-1] + (kernel.shape[-1],))
