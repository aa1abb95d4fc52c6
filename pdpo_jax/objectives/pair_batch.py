"""What every preference objective takes and declares: a batch of pairs' sequence log-probs, the
masked sums its loss and metrics are made of, what it needs, and what it starts at.

Pure and jit-friendly, like the objectives built on it (`preference`, `simpo`, `orpo`, `rpo`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from pdpo_jax.objectives.metrics import Metric, Metrics, detached


@dataclass(frozen=True)
class Needs:
    """The inputs an objective reads besides the policy's summed log-probs."""

    reference_logps: bool  # the reference's summed log-probs of chosen and rejected
    token_counts: bool  # how many tokens each sum covers (mean log-probs, the chosen NLL)
    chosen_nll: bool  # the policy's NLL of the chosen responses (an SFT term; from sums and counts)


@dataclass(frozen=True)
class StartValue:
    """What a validation metric must be at step 0, where the policy is the reference model: a
    check that the stored reference log-probs belong to the policy's start."""

    metric: str  # the validation metric that holds it (`loss`, or the preference term of a sum)
    value: float
    formula: str  # how the value follows from the settings, for the message


@dataclass(frozen=True)
class PairLogps:
    """A batch of P preference pairs, every array `[P]`: the policy's summed log-probs, the
    reference's (None where not given), token counts (None where not given) and `pair_mask`
    (1 = a real pair; None = all real). Masked-out pairs stay out of every sum, whatever they hold."""

    policy_chosen: jax.Array
    policy_rejected: jax.Array
    ref_chosen: jax.Array | None = None
    ref_rejected: jax.Array | None = None
    chosen_tokens: jax.Array | None = None
    rejected_tokens: jax.Array | None = None
    pair_mask: jax.Array | None = None

    @property
    def weights(self) -> jax.Array:
        if self.pair_mask is None:
            return jnp.ones_like(self.policy_chosen, jnp.float32)
        return self.pair_mask.astype(jnp.float32)

    @property
    def num_pairs(self) -> jax.Array:
        return jnp.sum(self.weights)

    def masked_sum(self, values: jax.Array) -> jax.Array:
        """Sum over the real pairs; a masked pair's NaN or inf never leaks in."""
        weights = self.weights
        return jnp.sum(jnp.where(weights != 0, values * weights, 0.0))

    def mean(self, values: jax.Array) -> jax.Array:
        """Mean over the real pairs (0 when there are none)."""
        return self.masked_sum(values) / jnp.maximum(self.num_pairs, 1.0)

    def pair_metric(self, values: jax.Array) -> Metric:
        """`(sum over the real pairs, number of them)`, detached."""
        return detached(self.masked_sum(values), self.num_pairs)

    def mean_logps(self) -> tuple[jax.Array, jax.Array]:
        """The policy's per-token mean log-probs of chosen and rejected (length-normalised)."""
        chosen_tokens, rejected_tokens = self.counts()
        return (self.policy_chosen.astype(jnp.float32) / jnp.maximum(chosen_tokens, 1.0),
                self.policy_rejected.astype(jnp.float32) / jnp.maximum(rejected_tokens, 1.0))

    def chosen_nll(self) -> tuple[jax.Array, jax.Array]:
        """`(NLL summed over every chosen token of the real pairs, their number)`: the chosen
        responses' token-mean NLL is the first over the second, the mean over all chosen tokens of
        the batch (TRL's SFT term). Differentiable in the policy's log-probs."""
        chosen_tokens, _ = self.counts()
        return -self.masked_sum(self.policy_chosen.astype(jnp.float32)), self.masked_sum(chosen_tokens)

    def counts(self) -> tuple[jax.Array, jax.Array]:
        if self.chosen_tokens is None or self.rejected_tokens is None:
            raise ValueError("this objective needs chosen_tokens and rejected_tokens (tokens per summed log-prob)")
        return (jax.lax.stop_gradient(self.chosen_tokens.astype(jnp.float32)),
                jax.lax.stop_gradient(self.rejected_tokens.astype(jnp.float32)))


def reward_metrics(pairs: PairLogps, per_pair_loss: jax.Array, chosen_rewards: jax.Array,
                   rejected_rewards: jax.Array, chosen_logps: jax.Array, rejected_logps: jax.Array) -> Metrics:
    """The metrics every preference objective logs, with TRL's names, each `(sum over pairs,
    number of pairs)`: `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/accuracies` (chosen
    reward strictly greater), `rewards/margins`, `logps/chosen`, `logps/rejected`."""
    chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
    rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
    return {
        "loss": pairs.pair_metric(per_pair_loss),
        "rewards/chosen": pairs.pair_metric(chosen_rewards),
        "rewards/rejected": pairs.pair_metric(rejected_rewards),
        "rewards/accuracies": pairs.pair_metric((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": pairs.pair_metric(chosen_rewards - rejected_rewards),
        "logps/chosen": pairs.pair_metric(chosen_logps),
        "logps/rejected": pairs.pair_metric(rejected_logps),
    }
