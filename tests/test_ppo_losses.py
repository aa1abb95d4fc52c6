"""The PPO and classification math of `pdpo_jax.objectives`: golden values worked out by hand (in the
comments), and numpy references written from TRL's classic PPOTrainer formulas, on random arrays
with prompt columns before and padding after each response."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pdpo_jax.objectives import (
    adaptive_kl_coef,
    classification_loss,
    finalize_metrics,
    gae_advantages,
    kl_penalized_rewards,
    last_token_mask,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)

NLI_CLASSES = ("contradiction", "neutral", "entailment")


def response_mask(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    """Each row: a few prompt columns (0), a response (1), then padding (0)."""
    mask = np.zeros((rows, width), np.float32)
    for row in range(rows):
        start = int(rng.integers(0, width // 2))
        mask[row, start : start + int(rng.integers(1, width - start + 1))] = 1.0
    return mask


# --- GAE ---------------------------------------------------------------------------------------------


def test_gae_golden_values():
    # Row 0: a prompt column, then a 3-token response.  Masked: V = [0, .3, .6, .4], r = [0, .5, -.2, 1].
    #   gamma = 0.9, lam = 0.5 (gamma * lam = 0.45):
    #   t=3: delta = 1.0 + 0.9*0 - 0.4 = 0.6                      A = 0.6
    #   t=2: delta = -0.2 + 0.9*0.4 - 0.6 = -0.44                 A = -0.44 + 0.45*0.6 = -0.17
    #   t=1: delta = 0.5 + 0.9*0.6 - 0.3 = 0.74                   A = 0.74 + 0.45*(-0.17) = 0.6635
    # Row 1: a 2-token response, then padding whose (junk) rewards and values must not count:
    #   t=1: delta = 1.0 + 0 - 0.5 = 0.5                          A = 0.5
    #   t=0: delta = 0.2 + 0.9*0.5 - 0.1 = 0.55                   A = 0.55 + 0.45*0.5 = 0.775
    rewards = np.array([[7.0, 0.5, -0.2, 1.0], [0.2, 1.0, 5.0, 5.0]], np.float32)
    values = np.array([[9.0, 0.3, 0.6, 0.4], [0.1, 0.5, 7.0, 7.0]], np.float32)
    mask = np.array([[0, 1, 1, 1], [1, 1, 0, 0]], np.float32)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    np.testing.assert_allclose(advantages, [[0, 0.6635, -0.17, 0.6], [0.775, 0.5, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(returns, [[0, 0.9635, 0.43, 1.0], [0.875, 1.0, 0, 0]], atol=1e-6)


def trl_gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float):
    """TRL's `compute_advantages` loop, literally: masked values and rewards, the recurrence run
    over every column. Its values at masked columns are meaningless; only masked-in ones compare."""
    values, rewards = values * mask, rewards * mask
    length = rewards.shape[1]
    last, reversed_advantages = 0.0, []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_advantages.append(last)
    advantages = np.stack(reversed_advantages[::-1], axis=1)
    return advantages, advantages + values


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_trls_loop(gamma, lam):
    rng = np.random.default_rng(0)
    mask = response_mask(rng, 6, 12)
    rewards, values = rng.normal(size=(2, 6, 12)).astype(np.float32)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    expected_advantages, expected_returns = trl_gae(rewards, values, mask, gamma, lam)
    scored = mask != 0
    np.testing.assert_allclose(np.asarray(advantages)[scored], expected_advantages[scored], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(returns)[scored], expected_returns[scored], rtol=1e-5, atol=1e-5)
    assert not np.asarray(advantages)[~scored].any() and not np.asarray(returns)[~scored].any()


# --- rewards, whitening, the KL coefficient ----------------------------------------------------------


def test_kl_penalized_rewards_golden_values():
    # kl = logp - ref = [_, 0.5, -1, 0]; every token pays -0.1 * kl, the last one earns the score 2.
    logprobs = np.array([[-9.0, -1.0, -2.0, -0.5, -3.0]], np.float32)
    ref_logprobs = np.array([[-1.0, -1.5, -1.0, -0.5, -1.0]], np.float32)
    mask = np.array([[0, 1, 1, 1, 0]], np.float32)
    rewards, kl = kl_penalized_rewards(np.array([2.0], np.float32), logprobs, ref_logprobs, mask, kl_coef=0.1)
    np.testing.assert_allclose(kl, [[0, 0.5, -1.0, 0, 0]], atol=1e-7)
    np.testing.assert_allclose(rewards, [[0, -0.05, 0.1, 2.0, 0]], atol=1e-7)


def test_last_token_mask_marks_each_rows_last_response_token_and_nothing_on_empty_rows():
    mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(last_token_mask(mask), [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])


def test_masked_whiten_golden_and_numpy():
    # mean 2, unbiased variance ((1-2)^2 + 0 + (3-2)^2) / 2 = 1
    whitened = masked_whiten(np.array([[1.0, 2.0], [3.0, 9.0]], np.float32), np.array([[1, 1], [1, 0]], np.float32))
    np.testing.assert_allclose(whitened, [[-1.0, 0.0], [1.0, 0.0]], atol=1e-6)
    rng = np.random.default_rng(1)
    values, mask = rng.normal(3.0, 2.0, size=(5, 9)).astype(np.float32), response_mask(rng, 5, 9)
    kept = values[mask != 0]
    expected = (values - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(np.asarray(masked_whiten(values, mask))[mask != 0], expected[mask != 0], rtol=1e-5, atol=1e-5)
    unshifted = np.asarray(masked_whiten(values, mask, shift_mean=False))[mask != 0]
    np.testing.assert_allclose(unshifted, expected[mask != 0] + kept.mean(), rtol=1e-5, atol=1e-5)


def test_adaptive_kl_coefficient_golden_values():
    # error = clip(kl / 6 - 1, -0.2, 0.2); coef * (1 + error * 256 / 10000)
    for kl, expected in ((9.0, 0.2 * 1.00512), (3.0, 0.2 * 0.99488), (6.6, 0.2 * 1.00256), (6.0, 0.2)):
        assert float(adaptive_kl_coef(0.2, kl, target=6.0, horizon=10000.0, n_steps=256)) == pytest.approx(expected, rel=1e-6)


# --- clipped losses ----------------------------------------------------------------------------------


def test_policy_loss_golden_values():
    # ratios 1.5, 0.5, 1 with advantages 2, -1, 1 (the fourth token is masked out):
    #   -2*1.5 = -3  vs  -2*1.2 = -2.4  -> -2.4 (clipped)
    #   1*0.5 = 0.5  vs   1*0.8 = 0.8   ->  0.8 (clipped)
    #   -1           vs  -1             -> -1   (not clipped)
    old = np.zeros((1, 4), np.float32)
    logprobs = np.array([[math.log(1.5), math.log(0.5), 0.0, 5.0]], np.float32)
    advantages = np.array([[2.0, -1.0, 1.0, 100.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]], np.float32)
    loss, metrics = ppo_policy_loss(logprobs, old, advantages, mask, clip=0.2)
    values = finalize_metrics(metrics)
    assert float(loss) == pytest.approx(-2.6 / 3, abs=1e-6)
    assert values["loss/policy"] == pytest.approx(-2.6 / 3, abs=1e-6)
    assert values["policy/clipfrac"] == pytest.approx(2 / 3)
    assert values["policy/approxkl"] == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3, rel=1e-5)
    assert values["policy/ratio"] == pytest.approx(1.0, abs=1e-6)


def test_value_loss_golden_values():
    # values 1, 0, 2; rollout values 0.5, 0.5, 2; returns 2, 1, 0; clip 0.2:
    #   clipped values 0.7, 0.3, 2; squared errors (1, 1.69), (1, 0.49), (4, 4) -> max 1.69, 1, 4
    #   loss = 0.5 * (1.69 + 1 + 4) / 3 = 1.115; only the first takes the clipped term
    loss, metrics = ppo_value_loss(np.array([[1.0, 0.0, 2.0]], np.float32), np.array([[0.5, 0.5, 2.0]], np.float32),
                                   np.array([[2.0, 1.0, 0.0]], np.float32), np.ones((1, 3), np.float32), clip=0.2)
    values = finalize_metrics(metrics)
    assert float(loss) == pytest.approx(1.115, abs=1e-6) and values["loss/value"] == pytest.approx(1.115, abs=1e-6)
    assert values["val/clipfrac"] == pytest.approx(1 / 3)
    assert values["val/vpred"] == pytest.approx(1.0) and values["val/error"] == pytest.approx(2.0)


def test_clipped_losses_match_numpy_on_random_arrays():
    rng = np.random.default_rng(2)
    mask = response_mask(rng, 6, 10)
    old, advantages, old_values, returns = rng.normal(size=(4, 6, 10)).astype(np.float32)
    logprobs = old + rng.normal(0.0, 0.3, size=old.shape).astype(np.float32)
    values = old_values + rng.normal(0.0, 0.4, size=old.shape).astype(np.float32)
    on = mask != 0

    ratio = np.exp(logprobs - old)
    policy_terms = np.maximum(-advantages * ratio, -advantages * np.clip(ratio, 0.8, 1.2))
    loss, metrics = ppo_policy_loss(logprobs, old, advantages, mask, clip=0.2)
    assert float(loss) == pytest.approx(policy_terms[on].mean(), rel=1e-5)
    clipped = -advantages * np.clip(ratio, 0.8, 1.2) > -advantages * ratio
    assert finalize_metrics(metrics)["policy/clipfrac"] == pytest.approx(clipped[on].mean(), rel=1e-6)

    value_clipped = old_values + np.clip(values - old_values, -0.2, 0.2)
    value_terms = 0.5 * np.maximum((values - returns) ** 2, (value_clipped - returns) ** 2)
    loss, metrics = ppo_value_loss(values, old_values, returns, mask, clip=0.2)
    assert float(loss) == pytest.approx(value_terms[on].mean(), rel=1e-5)
    assert finalize_metrics(metrics)["val/clipfrac"] == pytest.approx(
        ((value_clipped - returns) ** 2 > (values - returns) ** 2)[on].mean(), rel=1e-6)


def test_policy_equal_to_the_rollout_gives_ratio_one_and_nothing_clipped():
    rng = np.random.default_rng(3)
    mask = response_mask(rng, 4, 8)
    logprobs, advantages = rng.normal(size=(2, 4, 8)).astype(np.float32)
    loss, metrics = ppo_policy_loss(logprobs, logprobs, advantages, mask, clip=0.2)
    values = finalize_metrics(metrics)
    assert values["policy/ratio"] == pytest.approx(1.0, abs=1e-7) and values["policy/clipfrac"] == 0.0
    assert values["policy/approxkl"] == 0.0
    assert float(loss) == pytest.approx(-advantages[mask != 0].mean(), rel=1e-5)  # the plain policy gradient


# --- classification ----------------------------------------------------------------------------------


def test_classification_loss_golden_values():
    # row 0: nll = logsumexp(2, 1, 0) - 2 = log(1 + e^-1 + e^-2) = 0.4076059, argmax 0 = label
    # row 1: nll = logsumexp(0, 0, 3) - 0 = 3 + log(1 + 2 e^-3) = 3.0949250, argmax 2 != label 1
    # row 2: masked out
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 0.0]], np.float32)
    loss, metrics = classification_loss(logits, np.array([0, 1, 1]), np.array([1, 1, 0]), NLI_CLASSES)
    values = finalize_metrics(metrics)
    assert float(loss) == pytest.approx((0.4076059 + 3.0949250) / 2, abs=1e-6)
    assert values["loss"] == pytest.approx(float(loss), abs=1e-6)
    assert values["accuracy"] == 0.5
    assert values["accuracy/contradiction"] == 1.0 and values["accuracy/neutral"] == 0.0
    assert math.isnan(values["accuracy/entailment"])  # no entailment row: nothing counted
