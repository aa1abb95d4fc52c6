"""PPO against the NLI reward, as TRL's classic PPOTrainer does it, on the loop SFT and DPO train with.

One loop step is one rollout (`PPOTrainer.train_step`):

1. the policy samples a response to each of `rl.batch_size` training prompts (`rollout.py`);
2. one jitted forward gives the policy's log-probs and values of the response tokens, another the
   frozen reference's log-probs; the NLI reward scores the response texts;
3. every response token is charged `kl_coef * (log p - log p_ref)` and the last one also earns the
   reward; GAE turns these into advantages (whitened over the rollout) and returns;
4. `ppo_epochs` passes over the rollout, each in shuffled minibatches of
   `mini_batch_size * grad_accum` rows, update the policy and the value head together with the
   clipped policy loss plus `vf_coef` times the clipped value loss (the jitted, sharded train step
   of SFT and DPO, with `ppo_objective`);
5. with `adaptive_kl`, the KL coefficient moves towards `kl_target`.

Validation answers the validation prompts greedily and reports their mean reward,
`objective/scores`, which picks the best model. At the first update of the first rollout the
policy is both the reference (KL 0) and the policy that sampled (ratio 1).

The value head is one linear map on the policy's own final hidden states, as in TRL's classic
`AutoModelForCausalLMWithValueHead`: one forward gives log-probs and values, and no second model is
trained (a critic as large as the policy would add its parameters, gradients and Adam moments
again, on top of the policy's and the frozen reference's). The price is that value gradients reach
the policy's trunk; TRL's small `vf_coef` (0.1) keeps them in proportion. The head starts at zero
(every value 0), so the first advantages are the rewards themselves.

Everything a step depends on is in the checkpointed `PPOState` (policy, value head, Adam moments,
KL coefficient) or fixed by (seed, step): the sampling seed, the minibatch order. A killed run
resumes to the parameters an uninterrupted one reaches.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from pdpo_jax.config import RLSection
from pdpo_jax.data import PromptEncoder
from pdpo_jax.generation import Greedy, Sampler
from pdpo_jax.objectives import (
    Metrics,
    adaptive_kl_coef,
    gae_advantages,
    kl_penalized_rewards,
    masked_whiten,
    merge_metrics,
    ppo_policy_loss,
    ppo_value_loss,
)
from pdpo_jax.model import Model, ModelConfig, pad_id
from pdpo_jax.nli import NliReward
from pdpo_jax.parallel import host_rows, place_batch, replicated
from pdpo_jax.rl.prompts import PromptBatches, RLPrompt
from pdpo_jax.rl.rollout import Rollout, rollout_seed, sample_rollout
from pdpo_jax.scoring import token_logps, token_logps_and_hidden
from pdpo_jax.train.loop import LoopPlan, run_loop, total_steps
from pdpo_jax.train.optim import make_optimizer
from pdpo_jax.train.steps import TrainState, create_train_state, jit_train_step, put_micro_batches, state_shardings

SELECT_METRIC = "objective/scores"


# --- the value head and the state -------------------------------------------------------------------


def init_value_head(hidden_size: int) -> dict[str, jax.Array]:
    return {"kernel": jnp.zeros((hidden_size, 1), jnp.float32), "bias": jnp.zeros((1,), jnp.float32)}


def values_of(hidden: jax.Array, value_head: dict[str, jax.Array]) -> jax.Array:
    """fp32 `[batch, length]` values from the trunk's final hidden states `[batch, length, hidden]`."""
    return (hidden.astype(jnp.float32) @ value_head["kernel"] + value_head["bias"])[..., 0]


class PPOState(struct.PyTreeNode):
    """The train state of PPO. `step` counts rollouts (the loop's steps); `learner` is a plain
    train state over `{"policy": ..., "value_head": ...}` whose own step counts optimizer updates."""

    step: jax.Array
    learner: TrainState
    kl_coef: jax.Array

    @property
    def params(self) -> Any:
        """The policy's parameters: what validation answers with and `best/` keeps."""
        return self.learner.params["policy"]


def ppo_state_shardings(policy_params: Any, value_head: Any, optimizer: optax.GradientTransformation,
                        mesh: Mesh) -> PPOState:
    trainable = {"policy": policy_params, "value_head": value_head}
    return PPOState(step=replicated(mesh), learner=state_shardings(trainable, optimizer, mesh), kl_coef=replicated(mesh))


def initial_ppo_state(policy_params: Any, value_head: Any, optimizer: optax.GradientTransformation, kl_coef: float,
                      shardings: PPOState) -> PPOState:
    """A fresh state; the learner gets its own copy of the policy, so `policy_params` can stay the
    frozen reference."""
    learner = jax.jit(functools.partial(create_train_state, optimizer=optimizer),
                      out_shardings=shardings.learner)({"policy": policy_params, "value_head": value_head})
    return PPOState(step=scalar_on(0, jnp.int32, shardings.step), learner=learner,
                    kl_coef=scalar_on(kl_coef, jnp.float32, shardings.kl_coef))


def scalar_on(value: float, dtype: Any, sharding: Any) -> jax.Array:
    """A replicated scalar every process of the run holds alike."""
    return jax.make_array_from_callback((), sharding, lambda _: np.asarray(value, dtype))


# --- the objective ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PPOSettings:
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    mini_batch_size: int = 4
    grad_accum: int = 1
    adaptive_kl: bool = True
    kl_target: float = 6.0
    kl_horizon: float = 10000.0

    @classmethod
    def from_section(cls, section: RLSection) -> "PPOSettings":
        return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})

    @property
    def update_rows(self) -> int:
        return self.mini_batch_size * self.grad_accum


def policy_and_values(params: Any, value_head: Any, config: ModelConfig, batch: dict[str, jax.Array]):
    """The policy's log-prob of every target `[batch, length]` and the values, from one forward."""
    logps, hidden = token_logps_and_hidden(params, config, batch)
    return logps, values_of(hidden, value_head)


def ppo_objective(trainable: dict[str, Any], batch: dict[str, jax.Array], *, config: ModelConfig,
                  settings: PPOSettings) -> tuple[jax.Array, Metrics]:
    """Summed `policy loss + vf_coef * value loss` over the response tokens of one micro-batch of
    rollout rows (the layout arrays plus `old_logps`, `old_values`, `advantages`, `returns`);
    `metrics["loss"]` = (that sum, tokens), with TRL's policy and value metrics."""
    logps, values = policy_and_values(trainable["policy"], trainable["value_head"], config, batch)
    mask = batch["loss_mask"]
    policy_loss, policy_metrics = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask,
                                                  clip=settings.cliprange)
    value_loss, value_metrics = ppo_value_loss(values, batch["old_values"], batch["returns"], mask,
                                               clip=settings.cliprange_value)
    tokens = policy_metrics["loss/policy"][1]
    summed = (policy_loss + settings.vf_coef * value_loss) * tokens
    return summed, {"loss": (jax.lax.stop_gradient(summed), tokens), **policy_metrics, **value_metrics}


@functools.partial(jax.jit, static_argnames=("gamma", "lam"))
def rollout_targets(scores, logps, ref_logps, values, mask, kl_coef, *, gamma: float, lam: float):
    """(per-token rewards, per-token KL, whitened advantages, returns) of one rollout."""
    rewards, kl = kl_penalized_rewards(scores, logps, ref_logps, mask, kl_coef=kl_coef)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    return rewards, kl, masked_whiten(advantages, mask), returns


@functools.lru_cache(maxsize=8)
def _jitted_rollout_scores(config: ModelConfig, mesh: Mesh) -> Callable:
    def scores(trainable, reference, batch):
        logps, values = policy_and_values(trainable["policy"], trainable["value_head"], config, batch)
        return logps, values, token_logps(reference, config, batch)

    return jax.jit(scores, out_shardings=replicated(mesh))


# --- one rollout and its updates --------------------------------------------------------------------


class PPOTrainer:
    """`train_step` and `validation_step` of `run_loop` for one PPO run."""

    def __init__(self, *, policy: Model, reference_params: Any, reward: NliReward, encoder: PromptEncoder,
                 train_prompts: list[RLPrompt], val_prompts: list[RLPrompt], settings: PPOSettings,
                 optimizer: optax.GradientTransformation, shardings: PPOState, sampler: Sampler, max_new_tokens: int,
                 length_bucket: int, mesh: Mesh, seed: int):
        self.policy = dataclasses.replace(policy, params=None)  # the model's description; params come per step
        self.reference_params, self.reward, self.encoder = reference_params, reward, encoder
        self.train_prompts, self.val_prompts, self.settings = train_prompts, val_prompts, settings
        self.sampler, self.max_new_tokens, self.length_bucket = sampler, max_new_tokens, length_bucket
        self.mesh, self.seed = mesh, seed
        objective = functools.partial(ppo_objective, config=policy.config, settings=settings)
        self._update = jit_train_step(objective, optimizer, mesh, shardings.learner)
        self._scores = _jitted_rollout_scores(policy.config, mesh)
        self._host_rows = host_rows(mesh)

    def _rollout(self, params: Any, prompt_batch: dict[str, np.ndarray], prompts: list[RLPrompt], sampler: Sampler,
                 seed: int) -> tuple[Rollout, np.ndarray]:
        """The rollout and its NLI rewards `[rows]` (0 on filler rows)."""
        rollout = sample_rollout(dataclasses.replace(self.policy, params=params), self.encoder, prompt_batch, prompts,
                                 max_new_tokens=self.max_new_tokens, sampler=sampler, seed=seed,
                                 length_bucket=self.length_bucket, mesh=self.mesh)
        scores = np.zeros(len(rollout.real), np.float32)
        scores[rollout.real] = self.reward(rollout.personas, rollout.responses)
        return rollout, scores

    def train_step(self, state: PPOState, prompt_batch: dict[str, np.ndarray]) -> tuple[PPOState, Metrics]:
        step = int(jax.device_get(state.step))
        settings = self.settings
        rollout, scores = self._rollout(state.params, prompt_batch, self.train_prompts, self.sampler,
                                        rollout_seed(self.seed, step))
        batch = rollout.batch
        logps, values, ref_logps = (np.asarray(x) for x in self._scores(state.learner.params, self.reference_params,
                                                                          place_batch(batch, self.mesh)))
        kl_coef = float(jax.device_get(state.kl_coef))
        _, kl, advantages, returns = (np.asarray(x) for x in rollout_targets(
            scores, logps, ref_logps, values, batch["loss_mask"], kl_coef, gamma=settings.gamma, lam=settings.lam))
        rollout_data = dict(batch, old_logps=logps, old_values=values, advantages=advantages, returns=returns)

        learner, metrics = state.learner, {}
        rows = len(rollout.real)
        for epoch in range(settings.ppo_epochs):
            order = np.random.default_rng([self.seed, step, epoch]).permutation(rows)
            for start in range(0, rows, settings.update_rows):
                stack = self._micro_batches(rollout_data, order[start : start + settings.update_rows])
                learner, update_metrics = self._update(learner, put_micro_batches(stack, self.mesh))
                update_metrics = jax.device_get(update_metrics)
                if not metrics:  # the policy has not moved yet: its ratio to the sampling policy is 1
                    metrics["policy/ratio_first_update"] = update_metrics["policy/ratio"]
                metrics = merge_metrics(metrics, update_metrics)

        metrics |= rollout_metrics(rollout, scores, logps, kl, batch["loss_mask"], kl_coef)
        mean_kl = float(metrics["objective/kl"][0] / max(metrics["objective/kl"][1], 1.0))
        if settings.adaptive_kl:
            kl_coef = float(adaptive_kl_coef(kl_coef, mean_kl, target=settings.kl_target, horizon=settings.kl_horizon,
                                             n_steps=int(rollout.real.sum())))
        new_state = PPOState(step=state.step + 1, learner=learner,
                             kl_coef=scalar_on(kl_coef, jnp.float32, state.kl_coef.sharding))
        return new_state, metrics

    def _micro_batches(self, rollout_data: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        """The rollout rows `rows` as a `[grad_accum, mini_batch_size, ...]` stack (on a pod, this
        host's part of it)."""
        shape = (self.settings.grad_accum, self.settings.mini_batch_size)
        stack = {key: value[rows].reshape(shape + value.shape[1:]) for key, value in rollout_data.items()}
        if self._host_rows is None:
            return stack
        return {key: np.take(value, self._host_rows(value.shape[1]), axis=1) for key, value in stack.items()}

    def validation_step(self, params: Any, prompt_batch: dict[str, np.ndarray]) -> Metrics:
        """The reward of greedy responses to validation prompts."""
        rollout, scores = self._rollout(params, prompt_batch, self.val_prompts, Greedy(), seed=0)
        real = rollout.real
        count = np.float32(real.sum())
        return {
            SELECT_METRIC: (np.float32(scores[real].sum()), count),
            "tokens/responses_len_mean": (np.float32(rollout.batch["loss_mask"][real].sum()), count),
            "tokens/stopped": (np.float32(rollout.stopped.sum()), count),
        }


def rollout_metrics(rollout: Rollout, scores: np.ndarray, logps: np.ndarray, kl: np.ndarray, mask: np.ndarray,
                    kl_coef: float) -> Metrics:
    """TRL's rollout metrics as (sum over the real rows, rows): `objective/kl` is the summed per-token
    KL of a response, `objective/entropy` its summed negative log-prob, `objective/non_score_reward`
    the KL penalty it paid, `objective/rlhf_reward` that plus `objective/scores` (the NLI reward)."""
    real = rollout.real
    count = np.float32(real.sum())
    kl_sums = kl.sum(axis=1)[real]
    penalties = -kl_coef * kl_sums

    def total(values: np.ndarray) -> tuple[np.float32, np.float32]:
        return np.float32(np.sum(values)), count

    return {
        "objective/kl": total(kl_sums),
        "objective/entropy": total(-(logps * (mask != 0)).sum(axis=1)[real]),
        "objective/non_score_reward": total(penalties),
        "objective/rlhf_reward": total(scores[real] + penalties),
        SELECT_METRIC: total(scores[real]),
        "objective/kl_coef": (np.float32(kl_coef), np.float32(1.0)),
        "tokens/responses_len_mean": total((mask != 0).sum(axis=1)[real]),
        "tokens/stopped": total(rollout.stopped),
    }


# --- the run ----------------------------------------------------------------------------------------


def fit_ppo(*, policy: Model, reward: NliReward, encoder: PromptEncoder, train_prompts: list[RLPrompt],
            val_prompts: list[RLPrompt], section: RLSection, sampler: Sampler, length_bucket: int, out_dir: Path,
            mesh: Mesh, seed: int) -> dict[str, Any]:
    """Runs (or resumes) PPO from `policy`, whose loaded parameters stay the frozen reference, in
    `out_dir` with the loop of SFT and DPO; returns the loop's summary (without the state)."""
    settings = PPOSettings.from_section(section)
    train = PromptBatches(train_prompts, section.batch_size, seed, shuffle=True, pad_id=pad_id(policy))
    val = PromptBatches(val_prompts, section.batch_size, seed, shuffle=False, pad_id=pad_id(policy))
    steps = total_steps(section.epochs, train.steps_per_epoch(), section.max_steps)
    updates_per_rollout = settings.ppo_epochs * (section.batch_size // settings.update_rows)
    optimizer, schedule = make_optimizer(section.optimizer, steps * updates_per_rollout)
    value_head = init_value_head(policy.config.hidden_size)
    shardings = ppo_state_shardings(policy.params, value_head, optimizer, mesh)
    state = initial_ppo_state(policy.params, value_head, optimizer, section.kl_coef, shardings)
    trainer = PPOTrainer(policy=policy, reference_params=policy.params, reward=reward, encoder=encoder,
                         train_prompts=train_prompts, val_prompts=val_prompts, settings=settings, optimizer=optimizer,
                         shardings=shardings, sampler=sampler, max_new_tokens=section.max_new_tokens,
                         length_bucket=length_bucket, mesh=mesh, seed=seed)
    plan = LoopPlan(stage_dir=out_dir, epochs=section.epochs, total_steps=steps, eval_every=section.eval_every,
                    checkpoint_every=section.checkpoint_every, select_metric=SELECT_METRIC, select_higher=True,
                    model_dir=Path(policy.path), description="rl")
    result = run_loop(plan, state, step_fn=trainer.train_step, eval_fn=trainer.validation_step, train_batches=train,
                      val_batches=val.all_batches(), put_batch=lambda batch: batch, state_shardings=shardings,
                      schedule=lambda step: schedule(step * updates_per_rollout), seed=seed)
    return {key: value for key, value in result.items() if key != "state"}
