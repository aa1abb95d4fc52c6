"""The objectives, one module per family, and the log-prob and metric math they share.

    logprobs        token and sequence log-probs from logits or hidden states
    sft             token-mean NLL of the response (`sft_loss`)
    preference      DPO and its variants over pairs of sequence log-probs (`dpo_loss`)
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
from pdpo_jax.objectives.preference import DPO_LOSS_TYPES, DPOSettings, DpoLossType, dpo_loss, split_chosen_rejected
from pdpo_jax.objectives.sft import sft_loss

__all__ = [
    "DPOSettings", "DPO_LOSS_TYPES", "DpoLossType", "Metric", "Metrics", "adaptive_kl_coef", "classification_loss", "dpo_loss",
    "finalize_metrics", "gae_advantages", "kl_penalized_rewards", "last_token_mask", "masked_mean", "masked_whiten",
    "merge_metrics", "ppo_policy_loss", "ppo_value_loss", "sequence_logprobs", "sft_loss", "split_chosen_rejected",
    "token_logprobs", "token_logprobs_at", "token_logprobs_from_hidden",
]
