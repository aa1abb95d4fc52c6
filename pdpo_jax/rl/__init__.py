"""PPO for the RL(DialogueNLI) baseline: prompts, rollouts and the PPO step on the training loop.

    prompts    `rl_prompts`, `PromptBatches`: persona + history prompts in deterministic epoch batches
    rollout    `sample_rollout`: responses sampled by the policy, laid out as `[prompt | response]` rows
    ppo        `fit_ppo`, `PPOTrainer`, `ppo_objective`: the rollout, the rewards and the clipped updates
"""

from pdpo_jax.rl.ppo import PPOSettings, PPOState, PPOTrainer, fit_ppo, ppo_objective
from pdpo_jax.rl.prompts import PromptBatches, RLPrompt, rl_prompts
from pdpo_jax.rl.rollout import Rollout, rollout_seed, sample_rollout

__all__ = [
    "PPOSettings", "PPOState", "PPOTrainer", "PromptBatches", "RLPrompt", "Rollout", "fit_ppo", "ppo_objective",
    "rl_prompts", "rollout_seed", "sample_rollout",
]
