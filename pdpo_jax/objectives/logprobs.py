"""Token and sequence log-probs: what every objective is computed from.

Pure and jit-friendly; they take logits, hidden states or log-probs laid out as in docs/design.md
("The batch layout"). Forward passes live elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pdpo_jax.projection import matmul_last_axis


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) under `logits`: `[B, T, V]`, `[B, T]` -> `[B, T]` float32.

    Normalised in float32 whatever the logits dtype; only the target entry of the log-softmax is
    formed (logit minus logsumexp), never the whole `[B, T, V]` log-softmax.
    """
    logits = logits.astype(jnp.float32)
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_logits - log_normaliser


def token_logprobs_from_hidden(
    hidden: jax.Array,
    unembedding: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = 512,
) -> jax.Array:
    """`token_logprobs(hidden @ unembedding, targets)` without ever holding all `[B, T, V]` logits.

    `hidden` is `[B, T, D]` (the decoder's final-norm states), `unembedding` is `[D, V]` (an lm_head
    kernel; pass `embedding.T` for tied embeddings), `targets` is `[B, T]`. The sequence is cut into
    chunks of `chunk_size` positions that are scored one after another (`lax.map`); each chunk's
    logits are recomputed in the backward pass (`jax.checkpoint`) instead of being stored, so the
    peak extra memory is one float32 `[B, chunk_size, V]` block in both passes. The batch axis is
    left whole, so a batch-sharded `hidden` stays sharded.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    batch, length, width = hidden.shape
    chunk_size = min(chunk_size, length)
    num_chunks = -(-length // chunk_size)
    padding = num_chunks * chunk_size - length
    hidden = jnp.pad(hidden, ((0, 0), (0, padding), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, padding)))
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk_size, width).swapaxes(0, 1)
    target_chunks = targets.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_logprobs(hidden_chunk: jax.Array, target_chunk: jax.Array, kernel: jax.Array) -> jax.Array:
        logits = matmul_last_axis(hidden_chunk, kernel, preferred_element_type=jnp.float32)
        return token_logprobs(logits, target_chunk)

    chunks = jax.lax.map(lambda xs: chunk_logprobs(xs[0], xs[1], unembedding), (hidden_chunks, target_chunks))
    return chunks.swapaxes(0, 1).reshape(batch, num_chunks * chunk_size)[:, :length]


def token_logprobs_at(
    hidden: jax.Array,
    unembedding: jax.Array,
    targets: jax.Array,
    columns: jax.Array,
    *,
    chunk_size: int = 512,
) -> jax.Array:
    """`token_logprobs_from_hidden` at the positions `columns` only; every other position gets 0.

    `columns` is `[B, S]`: indices into the length axis of each row; an index >= T is filler and
    ignored. The vocabulary projection, the costliest part of scoring a response after a long
    prompt, then runs over S positions per row instead of T.
    """
    length = hidden.shape[1]
    safe = jnp.minimum(columns, length - 1)
    picked_hidden = jnp.take_along_axis(hidden, safe[..., None], axis=1)
    picked_targets = jnp.take_along_axis(targets, safe, axis=1)
    logps = token_logprobs_from_hidden(picked_hidden, unembedding, picked_targets, chunk_size=chunk_size)
    rows = jnp.arange(hidden.shape[0])[:, None]
    return jnp.zeros(targets.shape, jnp.float32).at[rows, columns].set(logps, mode="drop")


def sequence_logprobs(
    token_logps: jax.Array,
    loss_mask: jax.Array,
    sequence_ids: jax.Array,
    num_sequences: int,
) -> tuple[jax.Array, jax.Array]:
    """Per-sequence summed log-probs and token counts, both `[num_sequences]` float32.

    Sums `token_logps * loss_mask` over the tokens of each `sequence_ids` value in `0..N-1`; tokens
    with id -1 (or outside the range) or a zero mask contribute nothing. Masked-out tokens are
    selected away rather than multiplied by zero, so a -inf or NaN log-prob on padding cannot leak in.
    """
    in_range = (sequence_ids >= 0) & (sequence_ids < num_sequences) & (loss_mask != 0)
    weights = jnp.where(in_range, loss_mask, 0.0).astype(jnp.float32)
    weighted = jnp.where(in_range, token_logps.astype(jnp.float32) * weights, 0.0)
    # Ignored tokens go to one extra bucket that is dropped, so no id is ever wrapped or clipped.
    buckets = jnp.where(in_range, sequence_ids, num_sequences).reshape(-1)
    logps = jax.ops.segment_sum(weighted.reshape(-1), buckets, num_segments=num_sequences + 1)
    counts = jax.ops.segment_sum(weights.reshape(-1), buckets, num_segments=num_sequences + 1)
    return logps[:num_sequences], counts[:num_sequences]
