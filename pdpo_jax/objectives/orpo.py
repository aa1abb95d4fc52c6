"""ORPO (Hong et al., 2024): the chosen responses' NLL plus an odds-ratio preference term, with no
reference model, as TRL's experimental `ORPOTrainer` computes it (`odds_ratio_loss` and the chosen
NLL), except that the NLL covers the chosen *response* tokens only, as our SFT does (TRL's also
covers the prompt's)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from pdpo_jax.errors import require
from pdpo_jax.objectives.metrics import Metrics, detached
from pdpo_jax.objectives.pair_batch import Needs, PairLogps, StartValue, reward_metrics

# A mean log-prob closer to 0 than this is a probability of 1 to float32 precision; log(1 - p) is
# taken there, so the odds stay finite and so do their gradients.
MAX_MEAN_LOGP = -float(jnp.finfo(jnp.float32).eps)


def log1mexp(x: jax.Array) -> jax.Array:
    """`log(1 - exp(x))` for `x < 0`, accurate on both sides of -ln 2 (log1p of -exp below it,
    log of -expm1 above), with `x` capped at `MAX_MEAN_LOGP`. Each branch sees only inputs it is
    finite on, so neither can put a NaN into the gradient of the other."""
    x = jnp.minimum(x, MAX_MEAN_LOGP)
    far = x < -math.log(2.0)
    return jnp.where(far, jnp.log1p(-jnp.exp(jnp.where(far, x, -1.0))), jnp.log(-jnp.expm1(jnp.where(far, -0.5, x))))


@dataclass(frozen=True)
class ORPOSettings:
    """`beta` is ORPO's λ, the weight of the odds-ratio term (TRL's ORPOConfig name and default)."""

    beta: float = 0.1

    kind: ClassVar[str] = "orpo"
    needs: ClassVar[Needs] = Needs(reference_logps=False, token_counts=True, chosen_nll=True)
    # At step 0 the loss is the SFT model's own NLL and odds, which no setting fixes.
    start: ClassVar[StartValue | None] = None

    def __post_init__(self) -> None:
        require(self.beta > 0, "{beta} must be positive", "dpo", got=self.beta)

    def loss(self, pairs: PairLogps) -> tuple[jax.Array, Metrics]:
        """`NLL - β · mean over pairs of log σ(log-odds)`, with c̄, r̄ the policy's per-token mean
        log-probs, `log-odds = (c̄ - r̄) - (log(1 - e^c̄) - log(1 - e^r̄))`, and NLL the mean over all
        chosen tokens of the batch.

        Metrics besides the shared ones (rewards `β c̄`, `β r̄`; `logps/*` are c̄, r̄):
        `nll_loss` (NLL sum, chosen tokens), `log_odds_ratio` (log σ(log-odds)), `log_odds_chosen`
        (the log-odds) and `loss/preference` (`-β log σ(log-odds)`), per pair.
        """
        chosen, rejected = pairs.mean_logps()
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = jax.nn.log_sigmoid(log_odds)
        preference = -self.beta * ratio
        nll_sum, chosen_count = pairs.chosen_nll()
        nll = nll_sum / jnp.maximum(chosen_count, 1.0)
        per_pair = preference + nll  # the batch's NLL on every pair, so the pair mean is the loss
        metrics = reward_metrics(pairs, per_pair, self.beta * chosen, self.beta * rejected, chosen, rejected)
        metrics |= {
            "nll_loss": detached(nll_sum, chosen_count),
            "log_odds_ratio": pairs.pair_metric(ratio),
            "log_odds_chosen": pairs.pair_metric(log_odds),
            "loss/preference": pairs.pair_metric(preference),
        }
        return pairs.mean(preference) + nll, metrics
