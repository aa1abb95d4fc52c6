"""Loss math: token and sequence log-probs, the SFT loss, the DPO family, and (sum, count) metrics.

Every function here is pure and jit-friendly. Forward passes live elsewhere; these take logits,
hidden states or log-probs laid out as in docs/design.md ("The batch layout").

Metrics are `(sum, count)` pairs rather than means, so that summing them over gradient-accumulation
micro-batches or across hosts (`jax.lax.psum`, `merge_metrics`) and dividing once at the end gives the
exact mean over everything seen.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from pdpo_jax.matmul import matmul_last_axis

Metric = tuple[jax.Array, jax.Array]
"""A metric as `(sum, count)`; its value is `sum / count`."""
Metrics = dict[str, Metric]

DpoLossType = Literal["sigmoid", "ipo", "hinge"]
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge")


# --- token and sequence log-probs -----------------------------------------------------------------


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


def split_chosen_rejected(per_sequence: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split a `[2P]` per-sequence array of a DPO batch (chosen `2i`, rejected `2i + 1`) into two `[P]`."""
    return per_sequence[0::2], per_sequence[1::2]


# --- losses ---------------------------------------------------------------------------------------


def sft_loss(token_logps: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, Metrics]:
    """Token-mean negative log-likelihood over the tokens where `loss_mask` is non-zero.

    Returns `(loss, {"loss": (nll_sum, token_count)})`; a batch with no scored token has loss 0.
    """
    scored = loss_mask != 0
    weights = jnp.where(scored, loss_mask, 0.0).astype(jnp.float32)
    nll_sum = -jnp.sum(jnp.where(scored, token_logps.astype(jnp.float32) * weights, 0.0))
    token_count = jnp.sum(weights)
    loss = nll_sum / jnp.maximum(token_count, 1.0)
    return loss, {"loss": _detached(nll_sum, token_count)}


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None,
    ref_rejected_logps: jax.Array | None,
    *,
    beta: float,
    loss_type: DpoLossType = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    pair_mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Mean DPO-family loss over pairs of sequence log-probs (all `[P]`), and TRL-named metrics.

    With `h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)`:
      * "sigmoid": `-(1 - ε) log σ(βh) - ε log σ(-βh)` (DPO; ε = `label_smoothing` > 0 is
        conservative DPO);
      * "ipo": `(h - 1/(2β))²` (pass per-token mean log-probs for the length-normalised IPO);
      * "hinge": `relu(1 - βh)`.
    `reference_free` uses a reference that gives every response the same probability: reference
    log-probs are taken as 0 in the loss and in the rewards, and may be passed as None.
    Reference log-probs never receive gradients. `pair_mask` (`[P]`, 1 = real pair) leaves padding
    pairs out of the loss and of every metric.

    Metrics, each `(sum over pairs, number of pairs)`: `loss`, `rewards/chosen`, `rewards/rejected`
    (β·(policy − reference), detached), `rewards/accuracies` (chosen reward strictly greater),
    `rewards/margins`, `logps/chosen`, `logps/rejected`.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"DPO beta must be positive, got {beta}")
    if loss_type != "sigmoid" and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing applies to the 'sigmoid' loss only, not to {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")

    policy_chosen = policy_chosen_logps.astype(jnp.float32)
    policy_rejected = policy_rejected_logps.astype(jnp.float32)
    if reference_free:
        ref_chosen = jnp.zeros_like(policy_chosen)
        ref_rejected = jnp.zeros_like(policy_rejected)
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("reference log-probs are required unless reference_free=True")
    else:
        ref_chosen = jax.lax.stop_gradient(ref_chosen_logps.astype(jnp.float32))
        ref_rejected = jax.lax.stop_gradient(ref_rejected_logps.astype(jnp.float32))

    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    h = chosen_logratios - rejected_logratios

    if loss_type == "sigmoid":
        per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(
            -beta * h
        )
    elif loss_type == "ipo":
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        per_pair = jax.nn.relu(1.0 - beta * h)

    weights = jnp.ones_like(per_pair) if pair_mask is None else pair_mask.astype(jnp.float32)
    num_pairs = jnp.sum(weights)

    def masked_sum(values: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(weights != 0, values * weights, 0.0))

    loss = masked_sum(per_pair) / jnp.maximum(num_pairs, 1.0)

    chosen_rewards = beta * jax.lax.stop_gradient(chosen_logratios)
    rejected_rewards = beta * jax.lax.stop_gradient(rejected_logratios)

    def pair_metric(values: jax.Array) -> Metric:
        return _detached(masked_sum(values), num_pairs)

    metrics = {
        "loss": pair_metric(per_pair),
        "rewards/chosen": pair_metric(chosen_rewards),
        "rewards/rejected": pair_metric(rejected_rewards),
        "rewards/accuracies": pair_metric((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": pair_metric(chosen_rewards - rejected_rewards),
        "logps/chosen": pair_metric(policy_chosen),
        "logps/rejected": pair_metric(policy_rejected),
    }
    return loss, metrics


# --- metrics --------------------------------------------------------------------------------------


def _detached(total: jax.Array, count: jax.Array) -> Metric:
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
