"""Loss math: token and sequence log-probs, the SFT loss, the DPO family, sentence-pair
classification, the PPO pieces (KL-penalised rewards, GAE, clipped policy and value losses, the
adaptive KL coefficient), and (sum, count) metrics.

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


# --- classification -------------------------------------------------------------------------------


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
    metrics = {"loss": _detached(nll_sum, count), "accuracy": _detached(jnp.sum(correct), count)}
    for index, name in enumerate(class_names):
        in_class = weights * (labels == index)
        metrics[f"accuracy/{name}"] = _detached(jnp.sum(correct * in_class), jnp.sum(in_class))
    return nll_sum / jnp.maximum(count, 1.0), metrics


# --- PPO ------------------------------------------------------------------------------------------
#
# Arrays are `[B, T]` in the batch layout: `mask` is the loss mask of the response tokens, and a
# position's log-prob and value belong to the token it predicts. Values past a response's last
# token count as 0, so each row's response is one episode ending at its last masked position.


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    weights = (mask != 0).astype(jnp.float32)
    return jnp.sum(jnp.where(weights != 0, values * weights, 0.0)) / jnp.maximum(jnp.sum(weights), 1.0)


def masked_whiten(values: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """`(values - mean) / std` over the masked entries (std with Bessel's correction, as TRL's
    `masked_whiten`); with `shift_mean=False` the mean is added back. Zero where `mask` is 0."""
    weights = (mask != 0).astype(jnp.float32)
    count = jnp.sum(weights)
    mean = masked_mean(values, mask)
    variance = jnp.sum(weights * (values - mean) ** 2) / jnp.maximum(count - 1.0, 1.0)
    whitened = (values - mean) * jax.lax.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * weights


def last_token_mask(mask: jax.Array) -> jax.Array:
    """1.0 at the last non-zero position of each row of `mask` `[B, T]`, 0 elsewhere (and on empty rows)."""
    filled = (mask != 0).astype(jnp.int32)
    length = filled.shape[-1]
    last = length - 1 - jnp.argmax(filled[:, ::-1], axis=-1)
    return (jnp.arange(length)[None, :] == last[:, None]) * (jnp.sum(filled, axis=-1, keepdims=True) > 0)


def kl_penalized_rewards(scores: jax.Array, logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array, *,
                         kl_coef: jax.Array | float) -> tuple[jax.Array, jax.Array]:
    """Per-token rewards `[B, T]` and the per-token KL estimate `logprobs - ref_logprobs`.

    Every response token is charged `-kl_coef * kl`; the last one also earns the sequence's score
    `[B]` (the reward model speaks once, at the end of the response). Zero where `mask` is 0.
    """
    weights = (mask != 0).astype(jnp.float32)
    kl = (logprobs.astype(jnp.float32) - ref_logprobs.astype(jnp.float32)) * weights
    rewards = -kl_coef * kl + scores.astype(jnp.float32)[:, None] * last_token_mask(mask)
    return rewards, kl


def gae_advantages(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float,
                   lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimates and returns, both `[B, T]`, zero where `mask` is 0.

    TRL's recurrence, from the last position back: `delta_t = r_t + gamma V_{t+1} - V_t` with
    `V_{t+1} = 0` past the end of a response, `A_t = delta_t + gamma lam A_{t+1}`; `returns = A + V`.
    """
    weights = (mask != 0).astype(jnp.float32)
    rewards = rewards.astype(jnp.float32) * weights
    values = values.astype(jnp.float32) * weights
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def step_back(next_advantage, inputs):
        delta, weight = inputs
        advantage = (delta + gamma * lam * next_advantage) * weight
        return advantage, advantage

    _, reversed_advantages = jax.lax.scan(step_back, jnp.zeros_like(deltas[:, 0]), (deltas.T[::-1], weights.T[::-1]))
    advantages = reversed_advantages[::-1].T
    return advantages, (advantages + values) * weights


def ppo_policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                    clip: float) -> tuple[jax.Array, Metrics]:
    """PPO's clipped surrogate, the token mean of `max(-A r, -A clip(r, 1 - clip, 1 + clip))` with
    `r = exp(logprobs - old_logprobs)`. Old log-probs and advantages get no gradient.

    Metrics, each `(sum, tokens)`: `loss/policy`, `policy/clipfrac` (the clipped term was taken),
    `policy/approxkl` (`(logprobs - old)^2 / 2`), `policy/ratio`.
    """
    weights = (mask != 0).astype(jnp.float32)
    log_ratio = logprobs.astype(jnp.float32) - jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    ratio = jnp.exp(jnp.where(weights != 0, log_ratio, 0.0))
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    per_token = jnp.maximum(unclipped, clipped)
    return masked_mean(per_token, mask), _token_metrics(weights, {
        "loss/policy": per_token,
        "policy/clipfrac": (clipped > unclipped).astype(jnp.float32),
        "policy/approxkl": 0.5 * log_ratio**2,
        "policy/ratio": ratio,
    })


def ppo_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, *,
                   clip: float) -> tuple[jax.Array, Metrics]:
    """PPO's clipped value loss, `0.5 * max((V - R)^2, (V_clip - R)^2)` averaged over tokens, where
    `V_clip` is `values` kept within `clip` of the rollout's `old_values`.

    Metrics, each `(sum, tokens)`: `loss/value`, `val/clipfrac` (the clipped term was taken),
    `val/vpred` (the predicted values), `val/error` (`(V - R)^2`).
    """
    weights = (mask != 0).astype(jnp.float32)
    values = values.astype(jnp.float32)
    old_values = jax.lax.stop_gradient(old_values.astype(jnp.float32))
    returns = jax.lax.stop_gradient(returns.astype(jnp.float32))
    clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    per_token = 0.5 * jnp.maximum(unclipped, clipped)
    return masked_mean(per_token, mask), _token_metrics(weights, {
        "loss/value": per_token,
        "val/clipfrac": (clipped > unclipped).astype(jnp.float32),
        "val/vpred": values,
        "val/error": unclipped,
    })


def adaptive_kl_coef(kl_coef: jax.Array | float, kl: jax.Array | float, *, target: float, horizon: float,
                     n_steps: int) -> jax.Array:
    """The KL coefficient after a rollout of `n_steps` sequences whose mean summed KL was `kl`
    (Ziegler et al. 2019, as TRL's AdaptiveKLController): it grows when the KL is above `target`,
    shrinks below it, by at most 20% of `n_steps / horizon` per update."""
    error = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return jnp.asarray(kl_coef, jnp.float32) * (1.0 + error * n_steps / horizon)


def _token_metrics(weights: jax.Array, per_token: dict[str, jax.Array]) -> Metrics:
    count = jnp.sum(weights)
    return {name: _detached(jnp.sum(jnp.where(weights != 0, values * weights, 0.0)), count)
            for name, values in per_token.items()}


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
