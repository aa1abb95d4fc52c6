"""Jitted train and eval steps for SFT and DPO, with gradient accumulation and sharding.

A step takes a stack of micro-batches `[accumulation, batch, length]` (see docs/design.md for
the batch layout). Each objective returns the *sum* of its per-item losses and (sum, count)
metrics; gradients are summed over micro-batches and divided once by the total count, so the
result is the exact token mean (SFT) or pair mean (DPO) over the whole accumulated batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pdpo_jax.losses import (
    Metrics,
    dpo_loss,
    merge_metrics,
    sequence_logprobs,
    sft_loss,
    split_chosen_rejected,
    token_logprobs_from_hidden,
)
from pdpo_jax.model import Decoder, ModelConfig, unembedding
from pdpo_jax.parallel import param_shardings

LOGPROB_CHUNK = 256  # positions per chunk of fp32 logits when scoring (bounds [B, chunk, V] memory)

Objective = Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, Metrics]]


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any


def create_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def token_logps(params: Any, config: ModelConfig, batch: dict[str, jax.Array]) -> jax.Array:
    """log p(targets) at every position of a layout batch, `[batch, length]` fp32."""
    hidden, _ = Decoder(config).apply(
        {"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"],
        branch_ids=batch.get("branch_ids"), return_hidden=True,
    )
    return token_logprobs_from_hidden(hidden, unembedding(params, config).astype(hidden.dtype), batch["targets"],
                                      chunk_size=LOGPROB_CHUNK)


def sequence_scores(params: Any, config: ModelConfig, batch: dict[str, jax.Array], num_sequences: int):
    """Summed response log-probs and token counts of every scored sequence, both `[num_sequences]`.

    The one scoring function: DPO's reference log-probs and DNLI candidate ranking both use it.
    """
    logps = token_logps(params, config, batch)
    return sequence_logprobs(logps, batch["loss_mask"], batch["sequence_ids"], num_sequences)


def sft_objective(params: Any, batch: dict[str, jax.Array], *, config: ModelConfig) -> tuple[jax.Array, Metrics]:
    loss, metrics = sft_loss(token_logps(params, config, batch), batch["loss_mask"])
    return loss * metrics["loss"][1], metrics


@dataclass(frozen=True)
class DPOSettings:
    beta: float = 0.5
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference_free: bool = False


def dpo_objective(params: Any, batch: dict[str, jax.Array], *, config: ModelConfig,
                  settings: DPOSettings) -> tuple[jax.Array, Metrics]:
    """DPO on one micro-batch: one policy forward over every chosen and rejected sequence.

    Reference log-probs come with the batch (`ref_chosen_logps`, `ref_rejected_logps`, `[pairs]`):
    they were computed once by `sequence_scores` with the frozen SFT model.
    """
    num_pairs = batch["ref_chosen_logps"].shape[0]
    logps, _ = sequence_scores(params, config, batch, 2 * num_pairs)
    policy_chosen, policy_rejected = split_chosen_rejected(logps)
    loss, metrics = dpo_loss(
        policy_chosen, policy_rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"],
        beta=settings.beta, loss_type=settings.loss_type, label_smoothing=settings.label_smoothing,
        reference_free=settings.reference_free, pair_mask=batch.get("pair_mask"),
    )
    return loss * metrics["loss"][1], metrics


def _accumulate(objective: Objective, params: Any, micro_batches: dict[str, jax.Array], with_grads: bool):
    """Sums objective (and gradients) over the leading micro-batch axis with `lax.scan`."""
    first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
    _, metric_shapes = jax.eval_shape(objective, params, first)
    zero_metrics = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params) if with_grads else None

    def one_micro_batch(carry, batch):
        grads, metrics = carry
        if with_grads:
            (_, batch_metrics), batch_grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
            grads = jax.tree_util.tree_map(jnp.add, grads, batch_grads)
        else:
            _, batch_metrics = objective(params, batch)
        return (grads, merge_metrics(metrics, batch_metrics)), None

    (grads, metrics), _ = jax.lax.scan(one_micro_batch, (zero_grads, zero_metrics), micro_batches)
    return grads, metrics


def train_step(state: TrainState, micro_batches: dict[str, jax.Array], *, objective: Objective,
               optimizer: optax.GradientTransformation) -> tuple[TrainState, Metrics]:
    grads, metrics = _accumulate(objective, state.params, micro_batches, with_grads=True)
    count = jnp.maximum(metrics["loss"][1], 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / count, grads)
    metrics = dict(metrics, grad_norm=(optax.global_norm(grads), jnp.ones((), jnp.float32)))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, micro_batches: dict[str, jax.Array], *, objective: Objective) -> Metrics:
    return _accumulate(objective, params, micro_batches, with_grads=False)[1]


def batch_spec() -> P:
    """Micro-batch stacks `[accumulation, batch, ...]` are split over the data-parallel axes."""
    return P(None, ("data", "fsdp"))


def state_shardings(params_shape: Any, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Shardings of a train state on `mesh`: parameters by the partition rules, and optimizer
    moments as XLA propagates them from the parameters through `optimizer.init` (compiled only,
    never run, so this is also how an abstract restore target gets its shardings)."""
    params = param_shardings(params_shape, mesh)
    abstract = jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), params_shape, params
    )
    compiled = jax.jit(partial(create_train_state, optimizer=optimizer)).lower(abstract).compile()
    return compiled.output_shardings


def jit_train_step(objective: Objective, optimizer: optax.GradientTransformation, mesh: Mesh | None,
                   shardings: TrainState | None = None):
    """The jitted step; on a mesh, `shardings` comes from `state_shardings` and the state is donated."""
    step = partial(train_step, objective=objective, optimizer=optimizer)
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, in_shardings=(shardings, NamedSharding(mesh, batch_spec())),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)


def jit_eval_step(objective: Objective, mesh: Mesh | None, params_shape: Any = None):
    step = partial(eval_step, objective=objective)
    if mesh is None:
        return jax.jit(step)
    return jax.jit(step, in_shardings=(param_shardings(params_shape, mesh), NamedSharding(mesh, batch_spec())),
                   out_shardings=NamedSharding(mesh, P()))
