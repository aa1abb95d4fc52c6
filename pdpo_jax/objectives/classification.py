"""The sentence-pair classification objective of the NLI classifier behind the RL reward."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pdpo_jax.objectives.metrics import Metrics, detached


def classification_loss(logits: jax.Array, labels: jax.Array, label_mask: jax.Array,
                        class_names: tuple[str, ...]) -> tuple[jax.Array, Metrics]:
    """Mean cross-entropy of `logits` `[N, C]` against integer `labels` `[N]` over the rows where
    `label_mask` is non-zero, and accuracies.

    Metrics, each `(sum, rows)`: `loss`, `accuracy` (argmax equals the label; ties go to the lower
    class), and `accuracy/<name>` for each class over the rows of that class only.
    """
    logits = logits.astype(jnp.float32)
    weights = (label_mask != 0).astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    count = jnp.sum(weights)
    nll_sum = jnp.sum(jnp.where(weights != 0, nll, 0.0))
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32) * weights
    metrics = {"loss": detached(nll_sum, count), "accuracy": detached(jnp.sum(correct), count)}
    for index, name in enumerate(class_names):
        in_class = weights * (labels == index)
        metrics[f"accuracy/{name}"] = detached(jnp.sum(correct * in_class), jnp.sum(in_class))
    return nll_sum / jnp.maximum(count, 1.0), metrics
