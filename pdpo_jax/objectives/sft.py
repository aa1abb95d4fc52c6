"""The SFT objective: token-mean negative log-likelihood of the response tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pdpo_jax.objectives.metrics import Metrics, detached


def sft_loss(token_logps: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, Metrics]:
    """Token-mean negative log-likelihood over the tokens where `loss_mask` is non-zero.

    Returns `(loss, {"loss": (nll_sum, token_count)})`; a batch with no scored token has loss 0.
    """
    scored = loss_mask != 0
    weights = jnp.where(scored, loss_mask, 0.0).astype(jnp.float32)
    nll_sum = -jnp.sum(jnp.where(scored, token_logps.astype(jnp.float32) * weights, 0.0))
    token_count = jnp.sum(weights)
    loss = nll_sum / jnp.maximum(token_count, 1.0)
    return loss, {"loss": detached(nll_sum, token_count)}
