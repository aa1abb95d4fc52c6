"""Loss math: golden values written out with math/numpy, TRL parity, masking and chunking."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdpo_jax.objectives import (
    dpo_loss,
    finalize_metrics,
    merge_metrics,
    preference_loss,
    sequence_logprobs,
    sft_loss,
    split_chosen_rejected,
    token_logprobs,
    token_logprobs_at,
    token_logprobs_from_hidden,
)

# Three preference pairs whose reference log-probs differ from 0 and from the policy's.
POLICY_CHOSEN = [-5.0, -7.5, -3.25]
POLICY_REJECTED = [-6.0, -7.0, -9.125]
REF_CHOSEN = [-5.5, -7.0, -4.0]
REF_REJECTED = [-5.75, -7.5, -8.0]
BETA = 0.5
DPO_METRIC_NAMES = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
}


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def golden_dpo(loss_type: str, beta: float, label_smoothing: float, reference_free: bool) -> dict[str, float]:
    """Per-pair formulas in plain Python floats, averaged over the pairs."""
    rows = []
    for pc, pr, rc, rr in zip(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED):
        if reference_free:
            rc = rr = 0.0
        h = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            loss = -(1 - label_smoothing) * log_sigmoid(beta * h) - label_smoothing * log_sigmoid(-beta * h)
        elif loss_type == "ipo":
            loss = (h - 1 / (2 * beta)) ** 2
        else:
            loss = max(0.0, 1 - beta * h)
        chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
        rows.append(
            {
                "loss": loss,
                "rewards/chosen": chosen_reward,
                "rewards/rejected": rejected_reward,
                "rewards/accuracies": float(chosen_reward > rejected_reward),
                "rewards/margins": chosen_reward - rejected_reward,
                "logps/chosen": pc,
                "logps/rejected": pr,
            }
        )
    return {name: sum(row[name] for row in rows) / len(rows) for name in rows[0]}


def run_dpo(**kwargs):
    arrays = [jnp.asarray(v, jnp.float32) for v in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)]
    return dpo_loss(*arrays, **kwargs)


# --- token and sequence log-probs -----------------------------------------------------------------


def numpy_token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]


def test_token_logprobs_match_numpy_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(2, 5))
    got = token_logprobs(jnp.asarray(logits), jnp.asarray(targets, jnp.int32))
    assert got.dtype == jnp.float32 and got.shape == (2, 5)
    np.testing.assert_allclose(got, numpy_token_logprobs(logits, targets), atol=1e-5)


def test_token_logprobs_normalise_bf16_logits_in_float32():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(1, 4, 300)) * 8, jnp.bfloat16)
    targets = rng.integers(0, 300, size=(1, 4))
    got = token_logprobs(logits, jnp.asarray(targets, jnp.int32))
    assert got.dtype == jnp.float32
    # The bf16 values are exact in float64, so the only error left is float32 normalisation.
    np.testing.assert_allclose(got, numpy_token_logprobs(np.asarray(logits, np.float64), targets), atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 64])
def test_chunked_logprobs_equal_unchunked_values_and_gradients(chunk_size):
    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.normal(size=(2, 13, 8)), jnp.float32)
    unembedding = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, size=(2, 13)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(2, 13)), jnp.float32)

    def unchunked(h, w):
        return token_logprobs(h @ w, targets)

    def chunked(h, w):
        return token_logprobs_from_hidden(h, w, targets, chunk_size=chunk_size)

    np.testing.assert_allclose(chunked(hidden, unembedding), unchunked(hidden, unembedding), atol=1e-5)
    grads_unchunked = jax.grad(lambda h, w: jnp.sum(unchunked(h, w) * weights), argnums=(0, 1))(hidden, unembedding)
    grads_chunked = jax.jit(jax.grad(lambda h, w: jnp.sum(chunked(h, w) * weights), argnums=(0, 1)))(
        hidden, unembedding
    )
    for got, want in zip(grads_chunked, grads_unchunked):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_logprobs_at_chosen_columns_equal_the_full_ones_there_and_zero_elsewhere():
    rng = np.random.default_rng(5)
    hidden = jnp.asarray(rng.normal(size=(2, 13, 8)), jnp.float32)
    unembedding = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, size=(2, 13)), jnp.int32)
    columns = jnp.asarray([[2, 3, 7, 13, 13], [0, 12, 13, 13, 13]], jnp.int32)  # 13 = filler
    picked = np.zeros((2, 13), bool)
    picked[0, [2, 3, 7]] = picked[1, [0, 12]] = True
    weights = jnp.asarray(rng.normal(size=(2, 13)) * picked, jnp.float32)

    full = lambda h, w: token_logprobs_from_hidden(h, w, targets, chunk_size=4)  # noqa: E731
    at = lambda h, w: token_logprobs_at(h, w, targets, columns, chunk_size=4)  # noqa: E731
    got, want = np.asarray(at(hidden, unembedding)), np.asarray(full(hidden, unembedding))
    np.testing.assert_allclose(got[picked], want[picked], atol=1e-6)
    assert (got[~picked] == 0).all()
    grads_at = jax.jit(jax.grad(lambda h, w: jnp.sum(at(h, w) * weights), argnums=(0, 1)))(hidden, unembedding)
    grads_full = jax.grad(lambda h, w: jnp.sum(full(h, w) * weights), argnums=(0, 1))(hidden, unembedding)
    for got_grad, want_grad in zip(grads_at, grads_full):
        np.testing.assert_allclose(got_grad, want_grad, atol=1e-5)


def test_chunked_logprobs_gradient_never_holds_all_logits():
    batch, length, width, vocab = 2, 256, 16, 4096
    shapes = (
        jax.ShapeDtypeStruct((batch, length, width), jnp.float32),
        jax.ShapeDtypeStruct((width, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
    )

    def scratch_bytes(logprobs_fn) -> int:
        grad_fn = jax.grad(lambda h, w, t: jnp.sum(logprobs_fn(h, w, t)), argnums=(0, 1))
        analysis = jax.jit(grad_fn).lower(*shapes).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        return analysis.temp_size_in_bytes

    all_logits_bytes = batch * length * vocab * 4
    unchunked = scratch_bytes(lambda h, w, t: token_logprobs(h @ w, t))
    chunked = scratch_bytes(lambda h, w, t: token_logprobs_from_hidden(h, w, t, chunk_size=32))
    assert unchunked >= all_logits_bytes  # the measurement does see the full logits when they exist
    assert chunked < all_logits_bytes / 2


def test_chunked_logprobs_keep_a_batch_sharded_bf16_input_sharded():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = np.asarray(jax.devices())
    by_batch = NamedSharding(Mesh(devices, ("data",)), PartitionSpec("data"))
    rng = np.random.default_rng(5)
    hidden = jax.device_put(jnp.asarray(rng.normal(size=(len(devices), 10, 8)), jnp.bfloat16), by_batch)
    unembedding = jnp.asarray(rng.normal(size=(8, 30)), jnp.bfloat16)
    targets = jax.device_put(jnp.asarray(rng.integers(0, 30, size=(len(devices), 10)), jnp.int32), by_batch)
    logprobs_fn = jax.jit(lambda h, w, t: token_logprobs_from_hidden(h, w, t, chunk_size=4))
    got = logprobs_fn(hidden, unembedding, targets)
    assert got.dtype == jnp.float32 and got.sharding.is_equivalent_to(by_batch, got.ndim)
    assert "all-gather" not in logprobs_fn.lower(hidden, unembedding, targets).compile().as_text()
    # bf16 products are exact in float32, so this equals the float32 computation.
    want = token_logprobs(hidden.astype(jnp.float32) @ unembedding.astype(jnp.float32), targets)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_chunked_logprobs_reject_empty_chunks():
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs_from_hidden(jnp.zeros((1, 2, 3)), jnp.zeros((3, 4)), jnp.zeros((1, 2), jnp.int32), chunk_size=0)


def test_sequence_logprobs_sum_masked_tokens_per_sequence():
    token_logps = np.array([[-1.0, -2.0, -3.0, -4.0, -5.0], [-0.5, -0.25, -np.inf, np.nan, -8.0]], np.float32)
    loss_mask = np.array([[0, 1, 1, 1, 1], [1, 1, 0, 0, 1]], np.float32)
    sequence_ids = np.array([[-1, 0, 0, 1, 1], [2, 2, -1, 3, 3]], np.int32)
    logps, counts = sequence_logprobs(jnp.asarray(token_logps), jnp.asarray(loss_mask), jnp.asarray(sequence_ids), 4)
    # Sequence 0: -2 - 3; 1: -4 - 5; 2: -0.5 - 0.25 (the -inf is masked); 3: -8 (the NaN is masked).
    np.testing.assert_allclose(logps, [-5.0, -9.0, -0.75, -8.0])
    np.testing.assert_allclose(counts, [2.0, 2.0, 2.0, 1.0])


def test_split_chosen_rejected_follows_even_odd_numbering():
    chosen, rejected = split_chosen_rejected(jnp.arange(6.0))
    np.testing.assert_array_equal(chosen, [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(rejected, [1.0, 3.0, 5.0])


# --- masking and alignment ------------------------------------------------------------------------


def masked_batch(seed: int = 3):
    """One row `[prompt x3 | response x3 | padding x2]` scored as sequence 0."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(1, 8, 17)).astype(np.float32)
    targets = rng.integers(1, 17, size=(1, 8)).astype(np.int32)
    loss_mask = np.array([[0, 0, 0, 1, 1, 1, 0, 0]], np.float32)
    sequence_ids = np.array([[-1, -1, -1, 0, 0, 0, -1, -1]], np.int32)
    return logits, targets, loss_mask, sequence_ids


def score(logits, targets, loss_mask, sequence_ids):
    token_logps = token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
    loss, _ = sft_loss(token_logps, jnp.asarray(loss_mask))
    logps, _ = sequence_logprobs(token_logps, jnp.asarray(loss_mask), jnp.asarray(sequence_ids), 1)
    return float(loss), float(logps[0])


def test_prompt_and_padding_tokens_do_not_change_losses():
    logits, targets, loss_mask, sequence_ids = masked_batch()
    before = score(logits, targets, loss_mask, sequence_ids)
    unscored = loss_mask[0] == 0
    rng = np.random.default_rng(4)
    logits[0, unscored] = rng.normal(size=logits[0, unscored].shape) * 50
    targets[0, unscored] = rng.integers(0, 17, size=int(unscored.sum()))
    assert score(logits, targets, loss_mask, sequence_ids) == before
    # ...while a response token does change them.
    logits[0, 4] += 3 * np.eye(17, dtype=np.float32)[(targets[0, 4] + 1) % 17]
    after = score(logits, targets, loss_mask, sequence_ids)
    assert after[0] != before[0] and after[1] != before[1]


def test_logits_on_the_targets_give_zero_loss_and_shifted_ones_do_not():
    _, targets, loss_mask, sequence_ids = masked_batch()
    on_target = 40.0 * np.eye(17, dtype=np.float32)[targets]
    loss, logp = score(on_target, targets, loss_mask, sequence_ids)
    assert loss == pytest.approx(0.0, abs=1e-6) and logp == pytest.approx(0.0, abs=1e-5)
    # Mass on the next position's target (an off-by-one between logits and labels) is heavily penalised.
    shifted = 40.0 * np.eye(17, dtype=np.float32)[np.roll(targets, -1, axis=1)]
    assert score(shifted, targets, loss_mask, sequence_ids)[0] > 10.0


# --- SFT ------------------------------------------------------------------------------------------


def test_sft_loss_golden():
    token_logps = np.array([[-0.5, -1.5, -2.0, -0.25], [-3.0, -0.75, -1.0, -9.0]], np.float32)
    loss_mask = np.array([[0, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    loss, metrics = sft_loss(jnp.asarray(token_logps), jnp.asarray(loss_mask))
    expected_sum = 1.5 + 2.0 + 3.0 + 0.75
    assert float(loss) == pytest.approx(expected_sum / 4)
    assert float(metrics["loss"][0]) == pytest.approx(expected_sum) and float(metrics["loss"][1]) == 4.0
    assert finalize_metrics(metrics) == {"loss": pytest.approx(expected_sum / 4)}


def test_sft_loss_of_an_unscored_batch_is_zero_not_nan():
    loss, metrics = sft_loss(jnp.full((1, 3), -2.0), jnp.zeros((1, 3)))
    assert float(loss) == 0.0 and float(metrics["loss"][1]) == 0.0


def test_sft_gradient_reaches_only_scored_tokens():
    loss_mask = jnp.asarray([[0.0, 1.0, 1.0, 0.0]])
    grad = jax.grad(lambda lp: sft_loss(lp, loss_mask)[0])(jnp.full((1, 4), -1.0))
    np.testing.assert_allclose(grad, [[0.0, -0.5, -0.5, 0.0]])


# --- DPO: golden values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_type, label_smoothing, reference_free",
    [
        ("sigmoid", 0.0, False),
        ("sigmoid", 0.1, False),
        ("sigmoid", 0.0, True),
        ("sigmoid", 0.2, True),
        ("ipo", 0.0, False),
        ("ipo", 0.0, True),
        ("hinge", 0.0, False),
        ("hinge", 0.0, True),
    ],
)
def test_dpo_loss_and_every_metric_match_hand_computation(loss_type, label_smoothing, reference_free):
    loss, metrics = run_dpo(
        beta=BETA, loss_type=loss_type, label_smoothing=label_smoothing, reference_free=reference_free
    )
    expected = golden_dpo(loss_type, BETA, label_smoothing, reference_free)
    assert set(metrics) == DPO_METRIC_NAMES
    assert float(loss) == pytest.approx(expected["loss"], abs=1e-6)
    assert all(float(count) == 3.0 for _, count in metrics.values())
    finalized = finalize_metrics(metrics)
    for name, value in expected.items():
        assert finalized[name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("reference_free", [False, True])
def test_the_registry_kinds_of_the_dpo_family_give_the_same_numbers(loss_type, reference_free):
    loss, metrics = preference_loss(loss_type, POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA,
                                    reference_free=reference_free)
    expected = golden_dpo(loss_type, BETA, 0.0, reference_free)
    assert float(loss) == pytest.approx(expected["loss"], abs=1e-6)
    assert finalize_metrics(metrics) == pytest.approx(expected, abs=1e-6)


def test_dpo_golden_numbers_for_the_first_pair():
    # Pair 0 alone, written out: h = (-5 + 5.5) - (-6 + 5.75) = 0.75, beta * h = 0.375.
    loss, metrics = dpo_loss(
        jnp.asarray([-5.0]), jnp.asarray([-6.0]), jnp.asarray([-5.5]), jnp.asarray([-5.75]), beta=0.5
    )
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-0.375)), abs=1e-6)
    values = finalize_metrics(metrics)
    assert values["rewards/chosen"] == pytest.approx(0.25)
    assert values["rewards/rejected"] == pytest.approx(-0.125)
    assert values["rewards/margins"] == pytest.approx(0.375)
    assert values["rewards/accuracies"] == 1.0


@pytest.mark.parametrize("loss_type, expected", [("sigmoid", math.log(2)), ("ipo", 1.0), ("hinge", 1.0)])
def test_step_one_policy_equal_to_reference(loss_type, expected):
    logps = jnp.asarray(REF_CHOSEN), jnp.asarray(REF_REJECTED)
    loss, metrics = dpo_loss(*logps, *logps, beta=BETA, loss_type=loss_type)
    values = finalize_metrics(metrics)
    # ipo: (0 - 1/(2 * 0.5))^2 = 1; hinge: relu(1 - 0) = 1.
    assert float(loss) == pytest.approx(expected, abs=1e-7)
    assert values["rewards/margins"] == 0.0 and values["rewards/chosen"] == 0.0
    assert values["rewards/rejected"] == 0.0 and values["rewards/accuracies"] == 0.0


def test_reference_logprobs_are_used():
    loss, _ = run_dpo(beta=BETA)
    ignoring_reference, _ = dpo_loss(
        jnp.asarray(POLICY_CHOSEN), jnp.asarray(POLICY_REJECTED), jnp.zeros(3), jnp.zeros(3), beta=BETA
    )
    assert float(loss) == pytest.approx(golden_dpo("sigmoid", BETA, 0.0, False)["loss"], abs=1e-6)
    assert abs(float(loss) - float(ignoring_reference)) > 0.1


def test_beta_is_applied_once():
    loss, _ = run_dpo(beta=BETA)
    beta_twice = golden_dpo("sigmoid", BETA * BETA, 0.0, False)["loss"]
    assert abs(float(loss) - beta_twice) > 0.01


def test_dpo_gradients_are_the_closed_form_and_skip_the_reference():
    # d/d policy_chosen of mean_i -log σ(β h_i) is -β σ(-β h_i) / P; the reference gets nothing.
    arrays = [jnp.asarray(v, jnp.float32) for v in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)]
    grads = jax.grad(lambda *a: dpo_loss(*a, beta=BETA)[0], argnums=(0, 1, 2, 3))(*arrays)
    hs = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)]
    expected = [-BETA / (1 + math.exp(BETA * h)) / 3 for h in hs]
    np.testing.assert_allclose(grads[0], expected, rtol=1e-5)
    np.testing.assert_allclose(grads[1], [-g for g in expected], rtol=1e-5)
    np.testing.assert_array_equal(grads[2], 0.0)
    np.testing.assert_array_equal(grads[3], 0.0)


def test_reference_free_accepts_missing_reference():
    with_none, _ = dpo_loss(
        jnp.asarray(POLICY_CHOSEN), jnp.asarray(POLICY_REJECTED), None, None, beta=BETA, reference_free=True
    )
    ignored, _ = run_dpo(beta=BETA, reference_free=True)
    assert float(with_none) == float(ignored)
    with pytest.raises(ValueError, match="reference log-probs are required"):
        dpo_loss(jnp.asarray(POLICY_CHOSEN), jnp.asarray(POLICY_REJECTED), None, None, beta=BETA)


def test_padding_pairs_are_left_out():
    loss, metrics = run_dpo(beta=BETA, pair_mask=jnp.asarray([1.0, 0.0, 1.0]))
    every_pair = (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)
    arrays = [jnp.asarray(np.asarray(v)[[0, 2]], jnp.float32) for v in every_pair]
    subset_loss, subset_metrics = dpo_loss(*arrays, beta=BETA)
    assert float(loss) == pytest.approx(float(subset_loss), abs=1e-7)
    assert finalize_metrics(metrics) == pytest.approx(finalize_metrics(subset_metrics), abs=1e-7)
    # A padding pair holding garbage (here NaN) still stays out.
    nan_pair = jnp.asarray([POLICY_CHOSEN[0], math.nan, POLICY_CHOSEN[2]])
    others = (jnp.asarray(v) for v in (POLICY_REJECTED, REF_CHOSEN, REF_REJECTED))
    loss, _ = dpo_loss(nan_pair, *others, beta=BETA, pair_mask=jnp.asarray([1.0, 0.0, 1.0]))
    assert float(loss) == pytest.approx(float(subset_loss), abs=1e-7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": "kto"}, r"dpo.loss_type must be one of \['sigmoid', 'ipo', 'hinge'\], got 'kto'"),
        ({"beta": 0.0}, "beta must be positive"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing applies to the 'sigmoid' loss only"),
        ({"label_smoothing": 0.5}, r"label_smoothing must lie in \[0, 0.5\)"),
    ],
)
def test_dpo_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_dpo(**{"beta": BETA, **kwargs})


# --- metrics --------------------------------------------------------------------------------------


def test_merged_micro_batch_metrics_equal_whole_batch_metrics():
    arrays = [np.asarray(v, np.float32) for v in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)]
    _, whole = dpo_loss(*map(jnp.asarray, arrays), beta=BETA)
    _, first = dpo_loss(*(jnp.asarray(a[:1]) for a in arrays), beta=BETA)
    _, rest = dpo_loss(*(jnp.asarray(a[1:]) for a in arrays), beta=BETA)
    assert finalize_metrics(merge_metrics(first, rest)) == pytest.approx(finalize_metrics(whole), abs=1e-6)


def test_merge_keeps_names_present_on_one_side_and_finalize_marks_empty_metrics():
    merged = merge_metrics({"a": (1.0, 2.0)}, {"a": (3.0, 2.0), "b": (0.0, 0.0)})
    assert merged == {"a": (4.0, 4.0), "b": (0.0, 0.0)}
    values = finalize_metrics(merged)
    assert values["a"] == 1.0 and math.isnan(values["b"])


# --- parity with TRL ------------------------------------------------------------------------------


def trl_dpo(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, loss_type, label_smoothing=0.0, lengths=None
):
    """TRL's `DPOTrainer._compute_loss` run on given sequence log-probs through a stub model.

    The stub returns per-token log-probs whose row sums are the given sequence log-probs, with
    `lengths` completion tokens per sequence (chosen rows first, as TRL lays out its batch).
    """
    torch = pytest.importorskip("torch")
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    num_pairs = len(policy_chosen)
    sequence_logps = torch.tensor(list(policy_chosen) + list(policy_rejected), dtype=torch.float64)
    lengths = lengths or [1] * (2 * num_pairs)
    width = 1 + max(lengths)
    completion_mask = torch.zeros(2 * num_pairs, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        completion_mask[row, 1 : 1 + length] = 1
    per_token = torch.zeros(2 * num_pairs, width - 1, dtype=torch.float64)
    per_token[:, 0] = sequence_logps

    def model(**_kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    identity = lambda tensor: tensor  # noqa: E731
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=SimpleNamespace(device="cpu", gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * num_pairs, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * num_pairs, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(ref_chosen, dtype=torch.float64),
        "ref_rejected_logps": torch.tensor(ref_rejected, dtype=torch.float64),
    }
    loss = dpo_trainer.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    logged = {name: values[-1] for name, values in trainer._metrics["eval"].items()}
    return float(loss), logged


TRL_COMPARED = sorted(DPO_METRIC_NAMES - {"loss"})


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_parity_with_trl(loss_type, beta):
    want_loss, want = trl_dpo(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=beta, loss_type=loss_type)
    loss, metrics = run_dpo(beta=beta, loss_type=loss_type)
    assert float(loss) == pytest.approx(want_loss, abs=1e-6)
    got = finalize_metrics(metrics)
    for name in TRL_COMPARED:
        assert got[name] == pytest.approx(want[name], abs=1e-6), name


def test_parity_with_trl_at_step_one():
    want_loss, want = trl_dpo(REF_CHOSEN, REF_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA, loss_type="sigmoid")
    loss, metrics = dpo_loss(*(jnp.asarray(v) for v in (REF_CHOSEN, REF_REJECTED) * 2), beta=BETA)
    assert want_loss == pytest.approx(math.log(2)) and float(loss) == pytest.approx(want_loss, abs=1e-7)
    assert want["rewards/margins"] == finalize_metrics(metrics)["rewards/margins"] == 0.0


def test_parity_with_trl_length_normalised_ipo():
    # TRL's IPO divides each log-ratio by its completion length; per-token mean log-probs give the same.
    lengths = [3, 5, 2, 4, 7, 1]  # chosen rows, then rejected rows
    want_loss, _ = trl_dpo(
        POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA, loss_type="ipo", lengths=lengths
    )
    chosen_lengths, rejected_lengths = np.asarray(lengths[:3]), np.asarray(lengths[3:])
    loss, _ = dpo_loss(
        jnp.asarray(np.asarray(POLICY_CHOSEN) / chosen_lengths),
        jnp.asarray(np.asarray(POLICY_REJECTED) / rejected_lengths),
        jnp.asarray(np.asarray(REF_CHOSEN) / chosen_lengths),
        jnp.asarray(np.asarray(REF_REJECTED) / rejected_lengths),
        beta=BETA,
        loss_type="ipo",
    )
    assert float(loss) == pytest.approx(want_loss, abs=1e-6)


def test_conservative_dpo_matches_trl_on_a_single_pair():
    # TRL keeps the conservative (label-smoothed) sigmoid loss under "aot", which sorts the pairs of a
    # batch before applying it; on one pair the sort is the identity and the loss is conservative DPO.
    for i in range(3):
        want_loss, _ = trl_dpo(
            POLICY_CHOSEN[i : i + 1], POLICY_REJECTED[i : i + 1], REF_CHOSEN[i : i + 1], REF_REJECTED[i : i + 1],
            beta=BETA, loss_type="aot", label_smoothing=0.1,
        )
        loss, _ = dpo_loss(
            *(jnp.asarray(v[i : i + 1]) for v in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)),
            beta=BETA,
            label_smoothing=0.1,
        )
        assert float(loss) == pytest.approx(want_loss, abs=1e-6)
