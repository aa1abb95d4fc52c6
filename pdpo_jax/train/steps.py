"""Jitted train and eval steps for SFT, the preference objectives (DPO, SimPO, ORPO, RPO) and the NLI
classifier, with gradient accumulation and sharding.

A step takes a stack of micro-batches `[accumulation, batch, ...]` (see docs/design.md for the
batch layout; DPO micro-batches also carry `ref_chosen_logps`, `ref_rejected_logps` and optionally
`pair_mask`, all `[accumulation, pairs]`; classifier micro-batches carry `labels` and `label_mask`,
`[accumulation, rows]`). Each objective returns the *sum* of its per-item losses and (sum, count)
metrics; gradients are summed over micro-batches and divided once by the total count, so the
result is the exact token mean (SFT), pair mean (DPO) or row mean (classifier) over the whole
accumulated batch, however the items fall into micro-batches.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pdpo_jax.objectives import (DPOSettings, Metrics, PairLogps, PreferenceSettings, classification_loss,
                                 merge_metrics, objective_loss, sft_loss, split_chosen_rejected)
from pdpo_jax.model import ModelConfig
from pdpo_jax.model.classifier import classifier_logits
from pdpo_jax.parallel import BATCH_AXES, param_shardings, place_batch, replicated
from pdpo_jax.scoring import sequence_scores, token_logps

Objective = Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, Metrics]]
"""`(params, micro_batch) -> (summed loss, metrics)`; `metrics["loss"][1]` is what the sum is over."""


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any


def create_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


# --- objectives -------------------------------------------------------------------------------------


def sft_objective(params: Any, batch: dict[str, jax.Array], *, config: ModelConfig) -> tuple[jax.Array, Metrics]:
    """Summed response-token NLL of one micro-batch; `metrics["loss"]` = (NLL sum, token count)."""
    loss, metrics = sft_loss(token_logps(params, config, batch), batch["loss_mask"])
    # The metric sums are detached, so the differentiable sum is the mean times its (constant) count.
    return loss * metrics["loss"][1], metrics


def pairs_in(batch: dict[str, jax.Array]) -> int:
    """The (static) number of pairs of a DPO micro-batch, from its `[pairs]` arrays."""
    for key in ("ref_chosen_logps", "pair_mask"):
        if key in batch:
            return batch[key].shape[0]
    raise KeyError("a DPO batch needs `ref_chosen_logps`/`ref_rejected_logps` (or, reference-free, a `pair_mask`)")


def dpo_objective(params: Any, batch: dict[str, jax.Array], *, config: ModelConfig,
                  settings: PreferenceSettings) -> tuple[jax.Array, Metrics]:
    """Summed preference loss of one micro-batch (any registered objective: `settings` is
    `DPOSettings`, `SimPOSettings`, ...): one policy forward over every chosen and rejected sequence.

    Reference log-probs come with the batch (`ref_chosen_logps`, `ref_rejected_logps`, `[pairs]`):
    they were computed once by `sequence_scores` with the frozen SFT model, so the step never runs
    the reference; objectives that need none never read them. Token counts come from the forward.
    An objective's batch-level term (the chosen NLL of RPO and ORPO: the mean over the micro-batch's
    chosen tokens) is weighted by the micro-batch's pairs, so with accumulation the step's loss is
    the pair-weighted mean of its micro-batches' losses.
    """
    num_pairs = pairs_in(batch)
    logps, counts = sequence_scores(params, config, batch, 2 * num_pairs)
    policy_chosen, policy_rejected = split_chosen_rejected(logps)
    chosen_tokens, rejected_tokens = split_chosen_rejected(counts)
    uses_reference = settings.needs.reference_logps
    pairs = PairLogps(policy_chosen, policy_rejected,
                      batch.get("ref_chosen_logps") if uses_reference else None,
                      batch.get("ref_rejected_logps") if uses_reference else None,
                      chosen_tokens, rejected_tokens, batch.get("pair_mask"))
    loss, metrics = objective_loss(settings, pairs)
    return loss * metrics["loss"][1], metrics


def classifier_objective(params: Any, batch: dict[str, jax.Array], *, config: ModelConfig,
                         class_names: tuple[str, ...]) -> tuple[jax.Array, Metrics]:
    """Summed cross-entropy of a sequence classifier over the labelled rows of one micro-batch;
    `metrics["loss"]` = (summed loss, labelled rows), with overall and per-class accuracies."""
    logits = classifier_logits(params, config, batch["input_ids"], batch["positions"], batch["segment_ids"])
    loss, metrics = classification_loss(logits, batch["labels"], batch["label_mask"], class_names)
    return loss * metrics["loss"][1], metrics


# --- steps ------------------------------------------------------------------------------------------


def _accumulate(objective: Objective, params: Any, micro_batches: dict[str, jax.Array], with_grads: bool,
                grad_shardings: Any = None) -> tuple[Any, Metrics]:
    """Sums metrics (and gradients) over the leading micro-batch axis with `lax.scan`."""
    first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
    _, metric_shapes = jax.eval_shape(objective, params, first)
    zero_metrics = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params) if with_grads else None
    if with_grads and grad_shardings is not None:
        # Constants carry no sharding; without this the accumulator may be replicated on every device.
        zero_grads = jax.lax.with_sharding_constraint(zero_grads, grad_shardings)

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
               optimizer: optax.GradientTransformation, grad_shardings: Any = None) -> tuple[TrainState, Metrics]:
    """One optimizer update from the mean gradient over every item of every micro-batch.

    Metrics are the objective's summed (sum, count) pairs plus `grad_norm` (global norm of the mean
    gradient, before clipping).
    """
    grads, metrics = _accumulate(objective, state.params, micro_batches, True, grad_shardings)
    count = jnp.maximum(metrics["loss"][1], 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / count.astype(g.dtype), grads)
    metrics = dict(metrics, grad_norm=(optax.tree.norm(grads), jnp.ones((), jnp.float32)))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, micro_batches: dict[str, jax.Array], *, objective: Objective) -> Metrics:
    return _accumulate(objective, params, micro_batches, with_grads=False)[1]


# --- sharding and jit -------------------------------------------------------------------------------


def batch_spec() -> P:
    """Micro-batch stacks `[accumulation, batch, ...]` (and `[accumulation, pairs]`) are split over
    the data-parallel axes, so rows and pairs of a micro-batch must divide by data * fsdp. Row block
    k then holds exactly the pairs of pair block k (rows 2i and 2i + 1 are pair i)."""
    return P(None, BATCH_AXES)


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec())


def put_micro_batches(host_batch: dict[str, np.ndarray], mesh: Mesh | None = None) -> dict[str, jax.Array]:
    """Host micro-batch stack onto devices: the default device, or split over the mesh's batch axes
    (on several hosts each process passes its own rows of every micro-batch)."""
    return place_batch(host_batch, mesh, batch_axis=1, rows="local")


def state_shardings(params_shape: Any, optimizer: optax.GradientTransformation, mesh: Mesh | None = None) -> TrainState:
    """Shardings of a train state on `mesh`: parameters by the partition rules, every optimizer
    leaf that mirrors a parameter (Adam moments) like that parameter, everything else (step
    counts) replicated. Without a mesh, everything on the default device. Also what an abstract
    restore target carries."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shapes = jax.eval_shape(partial(create_train_state, optimizer=optimizer), params_shape)
        return jax.tree_util.tree_map(lambda _: device, shapes)
    params = param_shardings(params_shape, mesh)
    opt_shape = jax.eval_shape(optimizer.init, params_shape)
    opt_state = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, opt_shape, params,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )
    return TrainState(step=replicated(mesh), params=params, opt_state=opt_state)


def abstract_train_state(params_shape: Any, optimizer: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings for every leaf of a train state: an orbax restore target."""
    shapes = jax.eval_shape(partial(create_train_state, optimizer=optimizer), params_shape)
    return jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), shapes, shardings
    )


def jit_train_step(objective: Objective, optimizer: optax.GradientTransformation, mesh: Mesh | None = None,
                   shardings: TrainState | None = None):
    """`step(state, micro_batches) -> (state, metrics)`, jitted with the state donated. On a mesh,
    `shardings` comes from `state_shardings`; metrics come back replicated."""
    if mesh is None:
        return jax.jit(partial(train_step, objective=objective, optimizer=optimizer), donate_argnums=0)
    if shardings is None:
        raise ValueError("jit_train_step on a mesh needs the state shardings (see state_shardings)")
    step = partial(train_step, objective=objective, optimizer=optimizer, grad_shardings=shardings.params)
    return jax.jit(step, in_shardings=(shardings, micro_batch_sharding(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def jit_eval_step(objective: Objective, mesh: Mesh | None = None, params_shardings: Any = None):
    """`evaluate(params, micro_batches) -> metrics`, jitted (nothing donated)."""
    step = partial(eval_step, objective=objective)
    if mesh is None:
        return jax.jit(step)
    if params_shardings is None:
        raise ValueError("jit_eval_step on a mesh needs the parameter shardings (state_shardings(...).params)")
    return jax.jit(step, in_shardings=(params_shardings, micro_batch_sharding(mesh)), out_shardings=replicated(mesh))
