"""RPO (Pang et al., 2024, "Iterative Reasoning Preference Optimization"): DPO's sigmoid loss plus
α times the chosen responses' NLL, as TRL's `DPOTrainer` computes it with
`loss_type=["sigmoid", "sft"]` and `loss_weights=[1, α]` (TRL's `rpo_alpha`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from pdpo_jax.errors import require
from pdpo_jax.objectives.metrics import Metrics, detached
from pdpo_jax.objectives.pair_batch import Needs, PairLogps, StartValue
from pdpo_jax.objectives.preference import dpo_loss


@dataclass(frozen=True)
class RPOSettings:
    """`beta` as in DPO (TRL's default), `rpo_alpha` the weight of the chosen NLL (RPO's α = 1)."""

    beta: float = 0.1
    rpo_alpha: float = 1.0

    kind: ClassVar[str] = "rpo"
    needs: ClassVar[Needs] = Needs(reference_logps=True, token_counts=True, chosen_nll=True)
    # At policy = reference the DPO term is ln 2, as in DPO; the NLL term is the SFT model's own.
    start: ClassVar[StartValue | None] = StartValue("loss/preference", math.log(2.0), "-log σ(0) = ln 2")

    def __post_init__(self) -> None:
        require(self.beta > 0, "{beta} must be positive", "dpo", got=self.beta)
        require(self.rpo_alpha > 0, "{rpo_alpha} must be positive (0 is loss_type sigmoid)", "dpo",
                got=self.rpo_alpha)

    def loss(self, pairs: PairLogps) -> tuple[jax.Array, Metrics]:
        """`mean over pairs of -log σ(β h) + α · NLL`, h as in DPO and NLL the mean over all chosen
        tokens of the batch. Metrics are DPO's, plus `nll_loss` (NLL sum, chosen tokens) and
        `loss/preference` (the DPO term, per pair); `loss` is the total."""
        preference, metrics = dpo_loss(pairs.policy_chosen, pairs.policy_rejected, pairs.ref_chosen,
                                       pairs.ref_rejected, beta=self.beta, pair_mask=pairs.pair_mask)
        nll_sum, chosen_count = pairs.chosen_nll()
        weighted_nll = self.rpo_alpha * nll_sum / jnp.maximum(chosen_count, 1.0)
        dpo_sum, num_pairs = metrics["loss"]
        metrics |= {
            "loss": detached(dpo_sum + num_pairs * weighted_nll, num_pairs),
            "loss/preference": (dpo_sum, num_pairs),
            "nll_loss": detached(nll_sum, chosen_count),
        }
        return preference + weighted_nll, metrics
