"""PPO's pieces: KL-penalised rewards, generalised advantages, the clipped policy and value losses
and the adaptive KL coefficient, as TRL's classic PPOTrainer computes them.

Arrays are `[B, T]` in the batch layout: `mask` is the loss mask of the response tokens, and a
position's log-prob and value belong to the token it predicts. Values past a response's last
token count as 0, so each row's response is one episode ending at its last masked position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pdpo_jax.objectives.metrics import Metrics, token_metrics


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
    return masked_mean(per_token, mask), token_metrics(weights, {
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
    return masked_mean(per_token, mask), token_metrics(weights, {
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
