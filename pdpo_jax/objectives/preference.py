"""The DPO family of preference objectives (DPO and its IPO, hinge, conservative and
reference-free variants) over pairs of sequence log-probs, as TRL computes them and with TRL's
metric names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp

from pdpo_jax.errors import require
from pdpo_jax.objectives.metrics import Metric, Metrics, detached
from pdpo_jax.objectives.pair_batch import Needs, PairLogps, StartValue

DpoLossType = Literal["sigmoid", "ipo", "hinge"]
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge")


@dataclass(frozen=True)
class DPOSettings:
    """The settings of `dpo_loss` (kinds "sigmoid", "ipo" and "hinge" of `preference_loss`),
    checked when they are built. (The `dpo` config section holds the
    same keys and checks them when a config is loaded, so a run stops on a bad value before any
    work; this check is for code that calls the loss directly.)"""

    beta: float = 0.5
    loss_type: DpoLossType = "sigmoid"
    label_smoothing: float = 0.0
    reference_free: bool = False

    def __post_init__(self) -> None:
        require(self.loss_type in DPO_LOSS_TYPES, f"{{loss_type}} must be one of {list(DPO_LOSS_TYPES)}", "dpo",
                got=self.loss_type)
        require(self.beta > 0, "{beta} must be positive", "dpo", got=self.beta)
        require(self.loss_type == "sigmoid" or self.label_smoothing == 0.0,
                f"{{label_smoothing}} applies to the 'sigmoid' loss only, not to {{loss_type}} {self.loss_type!r}", "dpo")
        require(0.0 <= self.label_smoothing < 0.5, "{label_smoothing} must lie in [0, 0.5)", "dpo",
                got=self.label_smoothing)

    @property
    def kind(self) -> str:
        return self.loss_type

    @property
    def needs(self) -> Needs:
        return Needs(reference_logps=not self.reference_free, token_counts=False, chosen_nll=False)

    @property
    def start(self) -> StartValue | None:
        """At policy = reference every log-ratio h is 0, so the loss is a constant of the settings;
        reference-free, h is the policy's own log-prob difference, which no setting fixes."""
        if self.reference_free:
            return None
        if self.loss_type == "sigmoid":
            return StartValue("loss", math.log(2.0), "-log σ(0) = ln 2")
        if self.loss_type == "ipo":
            return StartValue("loss", 1.0 / (4.0 * self.beta**2), "(0 - 1/(2β))² = 1/(4β²)")
        return StartValue("loss", 1.0, "relu(1 - β·0) = 1")

    def loss(self, pairs: PairLogps) -> tuple[jax.Array, Metrics]:
        return dpo_loss(pairs.policy_chosen, pairs.policy_rejected, pairs.ref_chosen, pairs.ref_rejected,
                        beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                        reference_free=self.reference_free, pair_mask=pairs.pair_mask)


def split_chosen_rejected(per_sequence: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split a `[2P]` per-sequence array of a DPO batch (chosen `2i`, rejected `2i + 1`) into two `[P]`."""
    return per_sequence[0::2], per_sequence[1::2]


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
    DPOSettings(beta, loss_type, label_smoothing, reference_free)  # raises on a bad setting

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
        return detached(masked_sum(values), num_pairs)

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
