"""SimPO (Meng et al., 2024): a reference-free, length-normalised preference objective with a
target margin, as TRL's `CPOTrainer` computes it with `loss_type="simpo"` and `cpo_alpha=0`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax

from pdpo_jax.errors import require
from pdpo_jax.objectives.metrics import Metrics
from pdpo_jax.objectives.pair_batch import Needs, PairLogps, StartValue, reward_metrics


@dataclass(frozen=True)
class SimPOSettings:
    """`beta` scales the mean log-prob difference, `simpo_gamma` is the margin it must clear (TRL's
    CPOConfig names and defaults)."""

    beta: float = 0.1
    simpo_gamma: float = 0.5

    kind: ClassVar[str] = "simpo"
    needs: ClassVar[Needs] = Needs(reference_logps=False, token_counts=True, chosen_nll=False)
    # At step 0 the loss is that of the SFT model's own mean log-prob gaps, which no setting fixes.
    start: ClassVar[StartValue | None] = None

    def __post_init__(self) -> None:
        require(self.beta > 0, "{beta} must be positive", "dpo", got=self.beta)
        require(self.simpo_gamma >= 0, "{simpo_gamma} must be non-negative (a target margin)", "dpo",
                got=self.simpo_gamma)

    def loss(self, pairs: PairLogps) -> tuple[jax.Array, Metrics]:
        """Mean over pairs of `-log σ(β (c̄ - r̄) - γ)`, where c̄ and r̄ are the policy's per-token mean
        log-probs of chosen and rejected. Rewards are `β c̄` and `β r̄`; `logps/*` are c̄ and r̄ (TRL's)."""
        chosen, rejected = pairs.mean_logps()
        per_pair = -jax.nn.log_sigmoid(self.beta * (chosen - rejected) - self.simpo_gamma)
        metrics = reward_metrics(pairs, per_pair, self.beta * chosen, self.beta * rejected, chosen, rejected)
        return pairs.mean(per_pair), metrics
