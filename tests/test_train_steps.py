"""Train and eval steps: exact gradient accumulation, the DPO reference really used, sharded
steps equal to single-device ones, train-state restore across meshes.

Gradient comparisons use plain SGD with rate 1, so the parameter change *is* the mean gradient
(Adam's first update is close to sign(g) and would hide a wrongly weighted gradient); the
sharded test uses the real AdamW, whose first moments after one step are 0.1 * g.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import numpy as np
import optax
import pytest

from pdpo_jax import parallel
from pdpo_jax.data import SCORED_POSITIONS, with_scored_positions
from pdpo_jax.model.decoder import param_shapes
from pdpo_jax.model.model_dir import abstract_like
from pdpo_jax import scoring
from pdpo_jax.objectives import dpo_loss, split_chosen_rejected
from pdpo_jax.train import steps
from pdpo_jax.train.checkpoints import TrainCheckpointer
from pdpo_jax.config import OptimizerConfig
from pdpo_jax.train.optim import make_optimizer
from train_fixtures import (
    dpo_batch,
    micro_batches,
    random_params,
    sft_batch,
    tiny_llama_config,
    with_reference_logps,
)

CONFIG = tiny_llama_config()
SGD = optax.sgd(1.0)
DPO = steps.DPOSettings(beta=0.5)
GRAD_ATOL = 2e-6  # fp32 sums of a few hundred terms in a different order


def tree_max_abs_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


def fresh_state(params, optimizer=SGD) -> steps.TrainState:
    return steps.create_train_state(jax.device_put(params), optimizer)


@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG, seed=0)


@pytest.fixture(scope="module")
def score_fn():
    scorer = jax.jit(scoring.sequence_scores, static_argnums=(1, 3))
    return lambda p, batch: scorer(p, CONFIG, batch, batch["input_ids"].shape[0])[0]


@pytest.fixture(scope="module")
def dpo_data(params, score_fn):
    """8 pairs (the last one padding) with reference log-probs of the starting model."""
    batch = dpo_batch(seed=3, pairs=8, padding_pairs=1)
    return with_reference_logps(batch, partial(score_fn, jax.device_put(params)))


@pytest.fixture(scope="module")
def dpo_data_far_reference(dpo_data):
    """The same pairs with the reference moved away from the policy, so that rewards are not ties
    decided by rounding: 3 of the 7 real pairs have chosen reward > rejected reward at the start."""
    offsets = np.array([1, -1, 1, -1, 1, -1, 1, -1], np.float32)
    return dict(dpo_data, ref_chosen_logps=dpo_data["ref_chosen_logps"] + 1.5 * offsets,
                ref_rejected_logps=dpo_data["ref_rejected_logps"] - 0.5 * offsets)


@pytest.fixture(scope="module")
def dpo_step():
    return jax.jit(partial(steps.train_step, objective=partial(steps.dpo_objective, config=CONFIG, settings=DPO),
                           optimizer=SGD))


def test_sft_accumulation_equals_one_big_batch(params):
    batch = sft_batch(seed=1, rows=8)
    split = micro_batches(batch, 4)
    counts = split["loss_mask"].sum(axis=(1, 2))
    assert len(set(counts.tolist())) > 1, "micro-batches must hold different token counts for the test to bite"
    step = jax.jit(partial(steps.train_step, objective=partial(steps.sft_objective, config=CONFIG), optimizer=SGD))
    state_4x2, metrics_4x2 = step(fresh_state(params), split)
    state_1x8, metrics_1x8 = step(fresh_state(params), micro_batches(batch, 1))
    assert tree_max_abs_diff(state_4x2.params, state_1x8.params) < GRAD_ATOL
    assert float(metrics_4x2["loss"][1]) == float(metrics_1x8["loss"][1]) == batch["loss_mask"].sum()
    np.testing.assert_allclose(metrics_4x2["loss"][0], metrics_1x8["loss"][0], rtol=1e-6)
    np.testing.assert_allclose(metrics_4x2["grad_norm"][0], metrics_1x8["grad_norm"][0], rtol=1e-5)
    # The update is the token-mean gradient: SGD moved the parameters by exactly -grad.
    mean_loss = lambda p: steps.sft_objective(p, jax.tree.map(lambda x: x[0], micro_batches(batch, 1)), config=CONFIG)[0] / counts.sum()
    expected = jax.tree.map(lambda p, g: p - g, params, jax.jit(jax.grad(mean_loss))(jax.device_put(params)))
    assert tree_max_abs_diff(state_4x2.params, expected) < GRAD_ATOL


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_scoring_only_the_scored_positions_gives_the_same_step(params, dpo_data_far_reference, kind):
    """`scored_positions` (what the training loop's batches carry) changes the work, not the step."""
    if kind == "sft":
        batch, objective = sft_batch(seed=4, rows=8), partial(steps.sft_objective, config=CONFIG)
    else:
        batch, objective = dpo_data_far_reference, partial(steps.dpo_objective, config=CONFIG, settings=DPO)
    full = micro_batches(batch, 2)
    narrow = with_scored_positions(full)
    assert narrow[SCORED_POSITIONS].shape[-1] < full["input_ids"].shape[-1], "the test must skip some positions"
    first = jax.tree.map(lambda x: x[0], narrow)
    unscored = first["loss_mask"] == 0
    assert (np.asarray(scoring.token_logps(params, CONFIG, first))[unscored] == 0).all(), "scored_positions were ignored"
    step = jax.jit(partial(steps.train_step, objective=objective, optimizer=SGD))
    state_full, metrics_full = step(fresh_state(params), full)
    state_narrow, metrics_narrow = step(fresh_state(params), narrow)
    assert tree_max_abs_diff(state_full.params, state_narrow.params) < GRAD_ATOL
    for name in metrics_full:
        np.testing.assert_allclose(metrics_narrow[name], metrics_full[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_dpo_accumulation_equals_one_big_batch(params, dpo_data_far_reference, dpo_step):
    batch = dpo_data_far_reference
    state_4x2, metrics_4x2 = dpo_step(fresh_state(params), micro_batches(batch, 4))
    state_1x8, metrics_1x8 = dpo_step(fresh_state(params), micro_batches(batch, 1))
    assert tree_max_abs_diff(state_4x2.params, state_1x8.params) < GRAD_ATOL
    assert float(metrics_4x2["loss"][1]) == float(metrics_1x8["loss"][1]) == 7.0  # padding pair left out
    assert float(metrics_1x8["rewards/accuracies"][0]) == 3.0
    for name in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(metrics_4x2[name][0], metrics_1x8[name][0], rtol=1e-5, atol=1e-6, err_msg=name)


def test_padding_pair_contributes_nothing(params, dpo_data, dpo_step):
    garbage = dict(dpo_data, ref_chosen_logps=dpo_data["ref_chosen_logps"].copy())
    garbage["ref_chosen_logps"][-1] = 1e9  # the padding pair
    state_a, metrics_a = dpo_step(fresh_state(params), micro_batches(dpo_data, 4))
    state_b, metrics_b = dpo_step(fresh_state(params), micro_batches(garbage, 4))
    assert tree_max_abs_diff(state_a.params, state_b.params) == 0.0
    assert float(metrics_a["loss"][0]) == float(metrics_b["loss"][0])


def live_reference_objective(reference_params):
    """The DPO objective with the reference scored inside the step (a second forward per micro-batch)."""

    def objective(params, batch):
        pairs = steps.pairs_in(batch)
        policy, _ = scoring.sequence_scores(params, CONFIG, batch, 2 * pairs)
        reference, _ = scoring.sequence_scores(jax.lax.stop_gradient(reference_params), CONFIG, batch, 2 * pairs)
        loss, metrics = dpo_loss(*split_chosen_rejected(policy), *split_chosen_rejected(reference), beta=DPO.beta,
                                 loss_type=DPO.loss_type, label_smoothing=DPO.label_smoothing,
                                 pair_mask=batch.get("pair_mask"))
        return loss * metrics["loss"][1], metrics

    return objective


def test_reference_logps_are_used_and_match_a_live_reference(params, dpo_data, dpo_step):
    live_objective = live_reference_objective(jax.device_put(params))  # its own buffers: the state is donated
    live_step = jax.jit(partial(steps.train_step, objective=live_objective, optimizer=SGD))
    stack = micro_batches(dpo_data, 4)
    precomputed_state, live_state = fresh_state(params), fresh_state(params)
    losses = []
    for step in range(3):
        precomputed_state, precomputed = dpo_step(precomputed_state, stack)
        live_state, live = live_step(live_state, stack)
        for name, (total, count) in precomputed.items():
            if step == 0 and name == "rewards/accuracies":
                continue  # policy == reference: every reward is 0 and "chosen > rejected" is decided by rounding
            np.testing.assert_allclose(total, live[name][0], rtol=1e-5, atol=1e-5, err_msg=name)
            assert float(count) == float(live[name][1])
        losses.append(float(precomputed["loss"][0] / precomputed["loss"][1]))
    assert tree_max_abs_diff(precomputed_state.params, live_state.params) < 1e-5
    # policy == reference at step 1: every log-ratio is 0, the loss is ln 2 and the margin 0
    assert losses[0] == pytest.approx(math.log(2.0), abs=1e-6)
    assert losses[2] < losses[0] - 1e-3, "the policy moved away from the reference, so the loss must too"
    # a step that ignored the stored reference (taking it as 0) would not start at ln 2
    _, ignored = dpo_step(fresh_state(params), micro_batches(dict(dpo_data, ref_chosen_logps=0 * dpo_data["ref_chosen_logps"],
                                                                  ref_rejected_logps=0 * dpo_data["ref_rejected_logps"]), 4))
    assert abs(float(ignored["loss"][0] / ignored["loss"][1]) - math.log(2.0)) > 1e-2


def test_eval_step_metrics_equal_train_step_metrics(params, dpo_data, dpo_step):
    stack = micro_batches(dpo_data, 4)
    evaluate = steps.jit_eval_step(partial(steps.dpo_objective, config=CONFIG, settings=DPO))
    before = jax.device_put(params)
    eval_metrics = evaluate(before, stack)
    _, train_metrics = dpo_step(fresh_state(params), stack)
    assert set(train_metrics) == set(eval_metrics) | {"grad_norm"}
    for name, (total, count) in eval_metrics.items():
        np.testing.assert_allclose(total, train_metrics[name][0], rtol=1e-6, atol=1e-6, err_msg=name)
        assert float(count) == float(train_metrics[name][1])


@pytest.fixture(scope="module")
def adamw():
    return make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0), 10)[0]


@pytest.fixture(scope="module")
def sharded_and_single(params, dpo_data_far_reference, adamw):
    """One AdamW DPO step on a 2x2x2 mesh and on one device, from the same state and batch."""
    stack = micro_batches(dpo_data_far_reference, 2)  # 2 micro-batches of 4 pairs: rows and pairs divide by data*fsdp
    objective = partial(steps.dpo_objective, config=CONFIG, settings=DPO)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = steps.state_shardings(param_shapes(CONFIG), adamw, mesh)
    sharded_state = jax.device_put(steps.create_train_state(params, adamw), shardings)
    sharded_step = steps.jit_train_step(objective, adamw, mesh, shardings)
    sharded = sharded_step(sharded_state, steps.put_micro_batches(stack, mesh))
    single = steps.jit_train_step(objective, adamw)(fresh_state(params, adamw), steps.put_micro_batches(stack))
    return mesh, shardings, sharded, single


def test_sharded_step_equals_single_device(sharded_and_single):
    mesh, shardings, (sharded_state, sharded_metrics), (single_state, single_metrics) = sharded_and_single
    embedding = sharded_state.params["model"]["embed_tokens"]["embedding"]
    assert embedding.sharding.spec == shardings.params["model"]["embed_tokens"]["embedding"].spec
    assert not embedding.sharding.is_fully_replicated
    adam_moments = sharded_state.opt_state[1][0]
    mu = adam_moments.mu["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    assert mu.sharding.spec == parallel.P("fsdp", "tensor"), "Adam moments must be sharded like their parameters"
    assert int(sharded_state.step) == int(single_state.step) == 1
    # mu = 0.1 * clipped gradient, nu = 0.001 * its square: the gradients agree, not only their signs
    assert tree_max_abs_diff(sharded_state.opt_state, single_state.opt_state) < 1e-7
    # Adam's first update is lr * g / (|g| + eps): where |g| is near eps, rounding noise in g moves
    # it by a visible fraction of lr (1e-2), so the parameters get a looser bound than the moments.
    assert tree_max_abs_diff(sharded_state.params, single_state.params) < 1e-4
    assert abs(float(adam_moments.mu["model"]["norm"]["weight"].sum())) > 0
    # Reward sums are differences between log-prob sums of order 1e2 (fp32 spacing ~1e-5 there):
    # summing in another order moves a small reward sum by a few 1e-6.
    for name, (total, count) in single_metrics.items():
        np.testing.assert_allclose(sharded_metrics[name][0], total, rtol=1e-5, atol=1e-5, err_msg=name)
        assert float(sharded_metrics[name][1]) == float(count)


def test_restore_across_meshes(tmp_path, sharded_and_single, adamw):
    mesh, shardings, (sharded_state, _), (single_state, _) = sharded_and_single
    shapes = param_shapes(CONFIG)

    eight_to_one = TrainCheckpointer(tmp_path / "from_mesh")
    eight_to_one.save(1, sharded_state, {"epoch": 0, "index": 1})
    state_shapes = jax.eval_shape(partial(steps.create_train_state, optimizer=adamw), shapes)
    target = abstract_like(state_shapes, steps.state_shardings(shapes, adamw))
    restored, meta = eight_to_one.restore(target)
    assert meta == {"epoch": 0, "index": 1}
    assert all(len(leaf.devices()) == 1 for leaf in jax.tree.leaves(restored))
    assert tree_max_abs_diff(restored, sharded_state) == 0.0

    one_to_eight = TrainCheckpointer(tmp_path / "to_mesh")
    one_to_eight.save(1, single_state, {})
    restored, _ = one_to_eight.restore(abstract_like(state_shapes, shardings))
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    assert tree_max_abs_diff(restored, single_state) == 0.0
    eight_to_one.close()
    one_to_eight.close()
