"""The registry of preference objectives: each kind's settings class, which validates itself,
declares what the objective needs (`needs`) and where it starts (`start`), and computes it
(`loss(pairs)`). `preference_loss` is the one pure entry point over plain arrays.

    loss, metrics = preference_loss("simpo", chosen_logps, rejected_logps,
                                    chosen_tokens=chosen_counts, rejected_tokens=rejected_counts,
                                    beta=2.0, simpo_gamma=1.0)

docs/objectives.md gives every objective's formula, settings and start value.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

import jax
import jax.numpy as jnp

from pdpo_jax.objectives.metrics import Metrics
from pdpo_jax.objectives.orpo import ORPOSettings
from pdpo_jax.objectives.pair_batch import PairLogps
from pdpo_jax.objectives.preference import DPOSettings
from pdpo_jax.objectives.rpo import RPOSettings
from pdpo_jax.objectives.simpo import SimPOSettings

PreferenceSettings = Union[DPOSettings, SimPOSettings, ORPOSettings, RPOSettings]

# kind -> the settings class that computes it ("sigmoid", "ipo" and "hinge" are DPOSettings' loss_type)
PREFERENCE_OBJECTIVES: dict[str, type] = {
    "sigmoid": DPOSettings,
    "ipo": DPOSettings,
    "hinge": DPOSettings,
    "simpo": SimPOSettings,
    "orpo": ORPOSettings,
    "rpo": RPOSettings,
}
PREFERENCE_KINDS: tuple[str, ...] = tuple(PREFERENCE_OBJECTIVES)


def setting_names(kind: str) -> tuple[str, ...]:
    """The keyword settings `preference_loss(kind, ...)` accepts."""
    return tuple(f.name for f in dataclasses.fields(_settings_class(kind)) if f.name != "loss_type")


def preference_settings(kind: str, **settings: Any) -> PreferenceSettings:
    """The validated settings of objective `kind`; a setting the kind does not have is an error
    (never silently ignored)."""
    names = setting_names(kind)
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a setting of the {kind!r} preference objective; "
                         f"its settings are {list(names)}")
    if _settings_class(kind) is DPOSettings:
        return DPOSettings(loss_type=kind, **settings)
    return _settings_class(kind)(**settings)


def objective_loss(settings: PreferenceSettings, pairs: PairLogps) -> tuple[jax.Array, Metrics]:
    """`settings.loss(pairs)`, after checking that `pairs` carries what the objective needs."""
    needs = settings.needs
    if needs.reference_logps and (pairs.ref_chosen is None or pairs.ref_rejected is None):
        raise ValueError(f"the {settings.kind!r} preference objective needs ref_chosen_logps and ref_rejected_logps"
                         + (" (or reference_free=True)" if isinstance(settings, DPOSettings) else ""))
    if (needs.token_counts or needs.chosen_nll) and (pairs.chosen_tokens is None or pairs.rejected_tokens is None):
        raise ValueError(f"the {settings.kind!r} preference objective needs chosen_tokens and rejected_tokens "
                         "(the number of tokens each summed log-prob covers)")
    return settings.loss(pairs)


def preference_loss(
    kind: str,
    policy_chosen_logps: Any,
    policy_rejected_logps: Any,
    ref_chosen_logps: Any = None,
    ref_rejected_logps: Any = None,
    *,
    chosen_tokens: Any = None,
    rejected_tokens: Any = None,
    pair_mask: Any = None,
    **settings: Any,
) -> tuple[jax.Array, Metrics]:
    """The mean loss of preference objective `kind` over P pairs, and its metrics.

    Arrays are `[P]`: the policy's summed log-probs of each chosen and rejected response, the
    reference's (for kinds that use a reference; ignored by those that do not), the number of
    tokens each sum covers (for SimPO's and ORPO's mean log-probs and the chosen NLL of ORPO and
    RPO), and `pair_mask` (1 = real pair). Settings are keyword arguments named as TRL names them:
    `beta` (every kind; ORPO's λ), `label_smoothing` and `reference_free` (sigmoid; ipo and hinge
    take reference_free), `simpo_gamma` (simpo), `rpo_alpha` (rpo).

    Kinds: "sigmoid", "ipo", "hinge" (`dpo_loss`), "simpo", "orpo", "rpo". Metrics are
    `(sum, count)` pairs with TRL's names (`finalize_metrics` turns them into means). Pure and
    jit-friendly; reference log-probs never receive gradients.
    """
    objective = preference_settings(kind, **settings)
    pairs = PairLogps(*(None if a is None else jnp.asarray(a) for a in (
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_tokens,
        rejected_tokens, pair_mask)))
    return objective_loss(objective, pairs)


def _settings_class(kind: str) -> type:
    if kind not in PREFERENCE_OBJECTIVES:
        raise ValueError(f"unknown preference objective {kind!r}; the kinds are {list(PREFERENCE_KINDS)}")
    return PREFERENCE_OBJECTIVES[kind]
