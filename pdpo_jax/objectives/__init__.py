"""The objectives, one module per family, and the log-prob and metric math they share.

    logprobs        token and sequence log-probs from logits or hidden states
    sft             token-mean NLL of the response (`sft_loss`)
    pair_batch      what every preference objective takes (`PairLogps`), needs and starts at
    preference      DPO and its variants over pairs of sequence log-probs (`dpo_loss`)
    simpo, orpo, rpo  the other preference objectives, each a settings class with a `loss` method
    registry        the preference objectives by kind, and `preference_loss` over plain arrays
    classification  the NLI classifier's cross-entropy (`classification_loss`)
    ppo             KL-penalised rewards, GAE, clipped policy and value losses, adaptive KL
    metrics         `(sum, count)` metrics: merged exactly over micro-batches and hosts

Every function is pure and jit-friendly: it takes arrays and returns `(loss, metrics)` or arrays.
Forward passes live elsewhere.
"""

from pdpo_jax.objectives.classification import classification_loss
from pdpo_jax.objectives.logprobs import sequence_logprobs, token_logprobs, token_logprobs_at, token_logprobs_from_hidden
from pdpo_jax.objectives.metrics import Metric, Metrics, finalize_metrics, merge_metrics
from pdpo_jax.objectives.ppo import (
    adaptive_kl_coef,
    gae_advantages,
    kl_penalized_rewards,
    last_token_mask,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from pdpo_jax.objectives.orpo import ORPOSettings
from pdpo_jax.objectives.pair_batch import Needs, PairLogps, StartValue
from pdpo_jax.objectives.preference import DPO_LOSS_TYPES, DPOSettings, DpoLossType, dpo_loss, split_chosen_rejected
from pdpo_jax.objectives.registry import (PREFERENCE_KINDS, PREFERENCE_OBJECTIVES, PreferenceSettings, objective_loss,
                                          preference_loss, preference_settings, setting_names)
from pdpo_jax.objectives.rpo import RPOSettings
from pdpo_jax.objectives.sft import sft_loss
from pdpo_jax.objectives.simpo import SimPOSettings

__all__ = [
    "DPOSettings", "DPO_LOSS_TYPES", "DpoLossType", "Metric", "Metrics", "Needs", "ORPOSettings", "PREFERENCE_KINDS",
    "PREFERENCE_OBJECTIVES", "PairLogps", "PreferenceSettings", "RPOSettings", "SimPOSettings", "StartValue",
    "adaptive_kl_coef", "classification_loss", "dpo_loss", "finalize_metrics", "gae_advantages", "kl_penalized_rewards",
    "last_token_mask", "masked_mean", "masked_whiten", "merge_metrics", "objective_loss", "ppo_policy_loss",
    "ppo_value_loss", "preference_loss", "preference_settings", "sequence_logprobs", "setting_names", "sft_loss",
    "split_chosen_rejected", "token_logprobs", "token_logprobs_at", "token_logprobs_from_hidden",
]
