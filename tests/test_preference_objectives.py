"""The registry of preference objectives and `pdpo_jax.preference_loss`: SimPO, ORPO and RPO
against TRL's own loss code on the same inputs and against values worked by hand, ORPO's
gradients where probabilities approach 1, what each objective needs and starts at, and a few
training steps of each on a tiny model."""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import get_args, get_type_hints

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from prefs_fixtures import corpus_text, staged_slice, tiny_llama_with_words, write_config
from train_fixtures import dpo_batch, random_params, single_micro_batch, tiny_llama_config, with_reference_logps

import pdpo_jax
from pdpo_jax import cli, prefs, scoring
from pdpo_jax.config import DPOSection, load_config
from pdpo_jax.data import PromptEncoder
from pdpo_jax.model import load_model
from pdpo_jax.objectives import (PREFERENCE_KINDS, DPOSettings, ORPOSettings, RPOSettings, SimPOSettings,
                                 finalize_metrics, preference_loss, preference_settings, sft_loss)
from pdpo_jax.objectives.orpo import MAX_MEAN_LOGP, log1mexp
from pdpo_jax.stages import dpo, make_prefs
from pdpo_jax.stages.dpo import check_start
from pdpo_jax.storage import DONE_MARKER
from pdpo_jax.train import steps

# Ours runs in float32, TRL here in float64: the losses and metrics agree to float32 rounding of
# values of order 1-10.
TRL_TOL = 2e-6

# --- golden values worked by hand ------------------------------------------------------------------


def test_simpo_golden_pair():
    # c̄ = -6/3 = -2, r̄ = -12/4 = -3; β(c̄ - r̄) - γ = 2·1 - 1 = 1, so the loss is -log σ(1) = log(1 + e^-1).
    loss, metrics = preference_loss("simpo", [-6.0], [-12.0], chosen_tokens=[3], rejected_tokens=[4],
                                    beta=2.0, simpo_gamma=1.0)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-7)
    values = finalize_metrics(metrics)
    assert values["rewards/chosen"] == pytest.approx(-4.0) and values["rewards/rejected"] == pytest.approx(-6.0)
    assert values["rewards/margins"] == pytest.approx(2.0) and values["rewards/accuracies"] == 1.0
    assert values["logps/chosen"] == pytest.approx(-2.0) and values["logps/rejected"] == pytest.approx(-3.0)


def test_orpo_golden_pair():
    # Mean token probabilities 1/2 (chosen) and 1/4 (rejected): odds 1 and 1/3, log-odds ratio ln 3,
    # log σ(ln 3) = ln(3/4). The chosen NLL is -2 ln(1/2) / 2 = ln 2, so the loss is ln 2 - 0.1 ln(3/4).
    loss, metrics = preference_loss("orpo", [2 * math.log(0.5)], [3 * math.log(0.25)],
                                    chosen_tokens=[2], rejected_tokens=[3], beta=0.1)
    assert float(loss) == pytest.approx(math.log(2) - 0.1 * math.log(0.75), abs=1e-6)
    values = finalize_metrics(metrics)
    assert values["log_odds_chosen"] == pytest.approx(math.log(3), abs=1e-6)
    assert values["log_odds_ratio"] == pytest.approx(math.log(0.75), abs=1e-6)
    assert values["nll_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert values["loss/preference"] == pytest.approx(-0.1 * math.log(0.75), abs=1e-7)
    assert values["loss"] == pytest.approx(float(loss), abs=1e-7)


def test_rpo_golden_pairs_take_the_nll_over_all_chosen_tokens_of_the_batch():
    # Pair 0: h = (-5 + 5.5) - (-6 + 5.75) = 0.75; pair 1: h = (-3 + 4) - (-9 + 8) = 2. The chosen
    # NLL is (5 + 3) / (4 + 1) = 1.6 (not the mean of per-pair means, (5/4 + 3/1) / 2 = 2.125).
    loss, metrics = preference_loss("rpo", [-5.0, -3.0], [-6.0, -9.0], [-5.5, -4.0], [-5.75, -8.0],
                                    chosen_tokens=[4, 1], rejected_tokens=[3, 7], beta=0.5, rpo_alpha=0.5)
    dpo = (math.log1p(math.exp(-0.375)) + math.log1p(math.exp(-1.0))) / 2
    assert float(loss) == pytest.approx(dpo + 0.5 * 1.6, abs=1e-6)
    values = finalize_metrics(metrics)
    assert values["loss/preference"] == pytest.approx(dpo, abs=1e-6)
    assert values["nll_loss"] == pytest.approx(1.6, abs=1e-6)
    assert values["loss"] == pytest.approx(float(loss), abs=1e-6)
    assert values["rewards/margins"] == pytest.approx(0.5 * (0.75 + 2) / 2, abs=1e-6)


# --- parity with TRL -------------------------------------------------------------------------------

PAIRS, WIDTH, VOCAB = 4, 12, 11


def trl_batch(seed: int):
    """Random float64 logits `[2P, T, V]` and labels in TRL's concatenated layout (chosen rows,
    then rejected), prompt and padding labelled -100; responses of 1 to 8 tokens."""
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(2 * PAIRS, WIDTH, VOCAB, generator=generator, dtype=torch.float64)
    labels = torch.full((2 * PAIRS, WIDTH), -100, dtype=torch.long)
    for row in range(2 * PAIRS):
        prompt = int(torch.randint(1, 4, (1,), generator=generator))
        length = int(torch.randint(1, 9, (1,), generator=generator))
        labels[row, prompt:prompt + length] = torch.randint(0, VOCAB, (length,), generator=generator)
    return logits, labels


def summed_inputs(logits, labels):
    """What our loss takes: summed response log-probs and token counts per sequence, computed by
    TRL's own `get_batch_logps`, split into chosen and rejected."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    sums = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=False).numpy()
    counts = (labels[:, 1:] != -100).sum(-1).numpy()
    return sums[:PAIRS], sums[PAIRS:], counts[:PAIRS], counts[PAIRS:]


def trl_stub(**fields):
    identity = lambda tensor: tensor  # noqa: E731
    return SimpleNamespace(accelerator=SimpleNamespace(device="cpu", gather=identity, gather_for_metrics=identity),
                           **fields)


@pytest.fixture(autouse=True)
def quiet_trl_experimental(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.mark.parametrize("beta, gamma", [(2.0, 1.0), (0.1, 0.5), (2.5, 0.0)])
def test_simpo_equals_trl_cpo_trainer(beta, gamma):
    """TRL: `CPOTrainer(loss_type="simpo", cpo_alpha=0)`: `cpo_loss` on the per-token mean log-probs
    its `get_batch_logps(average_log_prob=True)` gives, averaged (the NLL term is 0)."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    logits, labels = trl_batch(seed=1)
    means = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    trainer = trl_stub(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, means[:PAIRS], means[PAIRS:])
    chosen, rejected, chosen_tokens, rejected_tokens = summed_inputs(logits, labels)
    loss, metrics = pdpo_jax.preference_loss("simpo", chosen, rejected, chosen_tokens=chosen_tokens,
                                             rejected_tokens=rejected_tokens, beta=beta, simpo_gamma=gamma)
    values = finalize_metrics(metrics)
    assert float(loss) == pytest.approx(losses.mean().item(), abs=TRL_TOL)
    assert values["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=TRL_TOL)
    assert values["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=TRL_TOL)
    assert values["rewards/accuracies"] == (chosen_rewards > rejected_rewards).double().mean().item()


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_equals_trl_orpo_trainer(beta):
    """TRL: `ORPOTrainer`'s loss is `chosen NLL - mean(odds_ratio_loss(...))` on mean log-probs. Its
    NLL is `nn.CrossEntropyLoss` over the chosen rows' labels; TRL labels the prompt too, ours
    scores the response alone, so both are given the response labels here."""
    torch = pytest.importorskip("torch")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logits, labels = trl_batch(seed=2)
    means = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    trainer = trl_stub(beta=beta)
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        trainer, means[:PAIRS], means[PAIRS:])
    nll = torch.nn.CrossEntropyLoss()(logits[:PAIRS, :-1].reshape(-1, VOCAB), labels[:PAIRS, 1:].reshape(-1))
    chosen, rejected, chosen_tokens, rejected_tokens = summed_inputs(logits, labels)
    loss, metrics = pdpo_jax.preference_loss("orpo", chosen, rejected, chosen_tokens=chosen_tokens,
                                             rejected_tokens=rejected_tokens, beta=beta)
    values = finalize_metrics(metrics)
    assert float(loss) == pytest.approx((nll - losses.mean()).item(), abs=TRL_TOL)
    assert values["nll_loss"] == pytest.approx(nll.item(), abs=TRL_TOL)
    assert values["log_odds_ratio"] == pytest.approx(log_odds_ratio.item(), abs=TRL_TOL)
    assert values["log_odds_chosen"] == pytest.approx(log_odds_chosen.item(), abs=TRL_TOL)
    assert values["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=TRL_TOL)
    assert values["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=TRL_TOL)


def trl_rpo(logits, labels, ref_chosen, ref_rejected, *, beta, alpha):
    """TRL 1.x's RPO: `DPOTrainer._compute_loss` with `loss_type=["sigmoid", "sft"]` and
    `loss_weights=[1, α]`, through a stub model that returns the per-token log-probs of `logits`."""
    torch = pytest.importorskip("torch")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer

    completion_mask = (labels != -100).long()
    safe_labels = labels[:, 1:].clamp(min=0)
    per_token = torch.log_softmax(logits[:, :-1], -1).gather(-1, safe_labels[..., None])[..., 0]
    per_token = per_token * completion_mask[:, 1:]
    assert torch.allclose(per_token.sum(1), CPOTrainer.get_batch_logps(logits, labels))

    def model(**_kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    trainer = trl_stub(
        model=SimpleNamespace(training=False), aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None,
        f_divergence_type="reverse_kl", loss_types=["sigmoid", "sft"], loss_weights=[1.0, alpha], beta=beta,
        label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones_like(labels),
              "completion_mask": completion_mask, "ref_chosen_logps": torch.tensor(ref_chosen, dtype=torch.float64),
              "ref_rejected_logps": torch.tensor(ref_rejected, dtype=torch.float64)}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss.item(), {name: values[-1] for name, values in trainer._metrics["eval"].items()}


@pytest.mark.parametrize("beta, alpha", [(0.1, 1.0), (0.5, 0.25)])
def test_rpo_equals_trl_dpo_trainer_with_an_sft_term(beta, alpha):
    logits, labels = trl_batch(seed=3)
    chosen, rejected, chosen_tokens, rejected_tokens = summed_inputs(logits, labels)
    ref_chosen, ref_rejected = chosen + np.linspace(-1.5, 2.0, PAIRS), rejected + np.linspace(1.0, -0.5, PAIRS)
    want, logged = trl_rpo(logits, labels, ref_chosen, ref_rejected, beta=beta, alpha=alpha)
    loss, metrics = pdpo_jax.preference_loss("rpo", chosen, rejected, ref_chosen, ref_rejected,
                                             chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
                                             beta=beta, rpo_alpha=alpha)
    assert float(loss) == pytest.approx(want, abs=TRL_TOL)
    values = finalize_metrics(metrics)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        assert values[name] == pytest.approx(logged[name], abs=TRL_TOL), name


# --- ORPO where probabilities approach 1 -----------------------------------------------------------


def test_log1mexp_is_accurate_on_both_sides_of_minus_ln_2():
    x = np.asarray([-30.0, -5.0, -0.7, -0.69, -0.1, -1e-3, -1e-5], np.float64)
    np.testing.assert_allclose(np.asarray(log1mexp(jnp.asarray(x, jnp.float32))), np.log(-np.expm1(x)),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mean_logp", [-1e-2, -1e-4, -1e-6, -1e-8, -1e-12, 0.0])
def test_orpo_gradients_stay_finite_as_log_probs_approach_zero(mean_logp):
    chosen_tokens, rejected_tokens = jnp.asarray([4.0, 4.0]), jnp.asarray([2.0, 2.0])
    near_one = jnp.asarray([mean_logp * 4, -8.0])  # one pair's chosen near probability 1 ...
    other = jnp.asarray([-6.0, mean_logp * 2])  # ... and the other pair's rejected

    def loss(chosen, rejected):
        return preference_loss("orpo", chosen, rejected, chosen_tokens=chosen_tokens,
                               rejected_tokens=rejected_tokens, beta=0.1)[0]

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(near_one, other)
    assert np.isfinite(float(value))
    for grad in grads:
        assert np.all(np.isfinite(np.asarray(grad))), grads
    # Above the cap, log(1 - p) is taken at the cap: the same loss as at the cap itself.
    if mean_logp > MAX_MEAN_LOGP:
        at_cap = loss(jnp.asarray([MAX_MEAN_LOGP * 4, -8.0]), jnp.asarray([-6.0, MAX_MEAN_LOGP * 2]))
        assert float(value) == pytest.approx(float(at_cap), rel=1e-5)


def test_orpo_gradient_is_the_finite_difference_near_zero():
    chosen_tokens, rejected_tokens = jnp.asarray([3.0]), jnp.asarray([3.0])

    def loss(chosen):
        return preference_loss("orpo", chosen, jnp.asarray([-0.03]), chosen_tokens=chosen_tokens,
                               rejected_tokens=rejected_tokens, beta=1.0)[0]

    point = np.float32(-0.006)
    grad = float(jax.grad(loss)(jnp.asarray([point]))[0])
    step = 1e-4
    with jax.enable_x64(True):
        numeric = (float(loss(jnp.asarray([point + step], jnp.float64)))
                   - float(loss(jnp.asarray([point - step], jnp.float64)))) / (2 * step)
    assert grad == pytest.approx(numeric, rel=1e-3)


# --- needs, settings, start values -----------------------------------------------------------------


def test_each_objective_declares_what_it_needs():
    assert preference_settings("sigmoid").needs.reference_logps
    assert not preference_settings("sigmoid", reference_free=True).needs.reference_logps
    assert not preference_settings("simpo").needs.reference_logps and preference_settings("simpo").needs.token_counts
    orpo = preference_settings("orpo").needs
    assert not orpo.reference_logps and orpo.token_counts and orpo.chosen_nll
    rpo = preference_settings("rpo").needs
    assert rpo.reference_logps and rpo.token_counts and rpo.chosen_nll


@pytest.mark.parametrize("kind, kwargs, message", [
    ("simpo", {}, "'simpo' preference objective needs chosen_tokens and rejected_tokens"),
    ("orpo", {}, "'orpo' preference objective needs chosen_tokens"),
    ("rpo", {"chosen_tokens": [3], "rejected_tokens": [2]}, "'rpo' preference objective needs ref_chosen_logps"),
    ("sigmoid", {}, "needs ref_chosen_logps and ref_rejected_logps \\(or reference_free=True\\)"),
])
def test_missing_inputs_are_named(kind, kwargs, message):
    with pytest.raises(ValueError, match=message):
        preference_loss(kind, [-3.0], [-4.0], **kwargs)


@pytest.mark.parametrize("kind, settings, message", [
    ("kto", {}, r"unknown preference objective 'kto'; the kinds are "
                r"\['sigmoid', 'ipo', 'hinge', 'simpo', 'orpo', 'rpo'\]"),
    ("orpo", {"simpo_gamma": 1.0}, r"'simpo_gamma' is not a setting of the 'orpo' preference objective; "
                                   r"its settings are \['beta'\]"),
    ("simpo", {"label_smoothing": 0.1}, "'label_smoothing' is not a setting of the 'simpo'"),
    ("simpo", {"beta": 0.0}, "dpo.beta must be positive, got 0.0"),
    ("simpo", {"simpo_gamma": -1.0}, "dpo.simpo_gamma must be non-negative"),
    ("rpo", {"rpo_alpha": 0.0}, "dpo.rpo_alpha must be positive"),
    ("orpo", {"beta": -0.1}, "dpo.beta must be positive"),
])
def test_bad_settings_are_refused(kind, settings, message):
    with pytest.raises(ValueError, match=message):
        preference_loss(kind, [-3.0], [-4.0], [-3.0], [-4.0], chosen_tokens=[2], rejected_tokens=[2], **settings)


@pytest.mark.parametrize("kind, settings, metric, value", [
    ("sigmoid", {"beta": 0.5}, "loss", math.log(2)),
    ("sigmoid", {"beta": 0.5, "label_smoothing": 0.2}, "loss", math.log(2)),
    ("ipo", {"beta": 0.5}, "loss", 1.0),
    ("ipo", {"beta": 0.25}, "loss", 4.0),
    ("hinge", {"beta": 0.3}, "loss", 1.0),
    ("rpo", {"beta": 0.5, "rpo_alpha": 2.0}, "loss/preference", math.log(2)),
])
def test_start_value_is_what_the_loss_gives_at_policy_equal_reference(kind, settings, metric, value):
    start = preference_settings(kind, **settings).start
    assert start.metric == metric and start.value == pytest.approx(value)
    logps = [-5.0, -7.25, -3.5], [-6.0, -2.0, -9.0]
    _, metrics = preference_loss(kind, *logps, *logps, chosen_tokens=[4, 2, 3], rejected_tokens=[5, 1, 6],
                                 **settings)
    values = finalize_metrics(metrics)
    assert values[metric] == pytest.approx(value, abs=1e-6) and values["rewards/margins"] == 0.0


@pytest.mark.parametrize("kind, settings", [("simpo", {}), ("orpo", {}), ("sigmoid", {"reference_free": True})])
def test_objectives_without_a_reference_state_no_start_value(kind, settings):
    assert preference_settings(kind, **settings).start is None


def test_check_start_reads_each_objectives_start_metric(tmp_path):
    def write(**row):
        (tmp_path / "metrics.jsonl").write_text('{"split": "val", "step": 0, ' + ", ".join(
            f'"{k.replace("_", "/")}": {v}' for k, v in row.items()) + "}\n")

    write(loss=1.0, rewards_margins=0.0)
    assert check_start(tmp_path, preference_settings("ipo", beta=0.5).start).startswith("ok")
    assert check_start(tmp_path, preference_settings("hinge").start).startswith("ok")
    assert check_start(tmp_path, preference_settings("sigmoid").start).startswith("mismatch")
    write(loss=2.5, loss_preference=math.log(2), rewards_margins=0.0)
    assert check_start(tmp_path, preference_settings("rpo").start).startswith("ok")
    assert check_start(tmp_path, preference_settings("simpo").start) == "not applicable"


@pytest.mark.parametrize("kind", ["simpo", "orpo", "rpo"])
def test_padding_pairs_are_left_out_of_every_term(kind):
    arrays = dict(policy_chosen_logps=[-5.0, math.nan, -3.0], policy_rejected_logps=[-6.0, -2.0, -9.0],
                  ref_chosen_logps=[-5.5, -1.0, -4.0], ref_rejected_logps=[-5.75, -2.0, -8.0],
                  chosen_tokens=[4, 7, 1], rejected_tokens=[3, 2, 7])
    loss, metrics = preference_loss(kind, **arrays, pair_mask=[1.0, 0.0, 1.0])
    subset = {name: [values[0], values[2]] for name, values in arrays.items()}
    want, want_metrics = preference_loss(kind, **subset)
    assert float(loss) == pytest.approx(float(want), abs=1e-7)
    assert finalize_metrics(metrics) == pytest.approx(finalize_metrics(want_metrics), abs=1e-7)


def test_preference_loss_is_the_settings_loss_for_the_dpo_family():
    logps = dict(policy_chosen_logps=[-5.0, -7.5], policy_rejected_logps=[-6.0, -7.0],
                 ref_chosen_logps=[-5.5, -7.0], ref_rejected_logps=[-5.75, -7.5])
    for kind in ("sigmoid", "ipo", "hinge"):
        loss, _ = preference_loss(kind, **logps, beta=0.5)
        direct, _ = pdpo_jax.dpo_loss(*(jnp.asarray(v) for v in logps.values()), beta=0.5, loss_type=kind)
        assert float(loss) == float(direct)


def test_config_kinds_are_the_registry_kinds_and_its_settings_build():
    assert get_args(get_type_hints(DPOSection)["loss_type"]) == PREFERENCE_KINDS
    expected = {"sigmoid": DPOSettings(beta=0.5), "simpo": SimPOSettings(beta=2.0, simpo_gamma=1.0),
                "orpo": ORPOSettings(beta=0.1), "rpo": RPOSettings(beta=0.5, rpo_alpha=1.0)}
    overrides = {"sigmoid": [], "simpo": ["dpo.beta=2.0", "dpo.simpo_gamma=1.0"], "orpo": ["dpo.beta=0.1"],
                 "rpo": ["dpo.beta=0.5"]}
    for kind, extra in overrides.items():
        dpo = load_config(None, [f"dpo.loss_type={kind}", *extra]).dpo
        assert preference_settings(dpo.loss_type, **dpo.objective_settings()) == expected[kind]


# --- the training step ------------------------------------------------------------------------------

CONFIG = tiny_llama_config()


@pytest.fixture(scope="module")
def start_params():
    return jax.device_put(random_params(CONFIG, seed=4))


@pytest.fixture(scope="module")
def reference_score(start_params):
    scorer = jax.jit(scoring.sequence_scores, static_argnums=(1, 3))
    return lambda batch: scorer(start_params, CONFIG, batch, batch["input_ids"].shape[0])[0]


def test_the_steps_chosen_nll_is_the_sft_loss_of_the_chosen_rows(start_params):
    """ORPO's NLL term, from the step's summed log-probs and counts, against `sft_loss` over the
    chosen rows' tokens alone (an independent path through the token log-probs)."""
    batch = dpo_batch(seed=11, pairs=4)
    _, metrics = steps.dpo_objective(start_params, batch, config=CONFIG, settings=ORPOSettings(beta=0.1))
    token_logps = scoring.token_logps(start_params, CONFIG, batch)
    chosen_rows = np.arange(8) % 2 == 0
    want, _ = sft_loss(token_logps[chosen_rows], batch["loss_mask"][chosen_rows])
    total, count = metrics["nll_loss"]
    assert float(total / count) == pytest.approx(float(want), rel=1e-5)
    assert float(count) == batch["loss_mask"][chosen_rows].sum()


def test_rpo_accumulation_weighs_each_micro_batch_by_its_pairs(start_params, reference_score):
    """Each micro-batch's NLL term is its own chosen-token mean (TRL's per-forward batch); the step's
    loss is the pairs' mean DPO term plus α times the pair-weighted mean of those NLLs."""
    batch = with_reference_logps(dpo_batch(seed=12, pairs=4), reference_score)
    alpha = 2.0
    objective = partial(steps.dpo_objective, config=CONFIG, settings=RPOSettings(beta=0.5, rpo_alpha=alpha))
    halves = []
    for rows, pairs in ((slice(0, 4), slice(0, 2)), (slice(4, 8), slice(2, 4))):
        half = {k: v[rows] if v.ndim == 2 else v[pairs] for k, v in batch.items()}
        half["sequence_ids"] = np.where(half["sequence_ids"] >= 0, half["sequence_ids"] - rows.start, -1)
        halves.append(half)
    stacked = {k: np.stack([halves[0][k], halves[1][k]]) for k in batch}
    values = finalize_metrics(steps.eval_step(start_params, stacked, objective=objective))
    half_nll = [finalize_metrics(objective(start_params, half)[1])["nll_loss"] for half in halves]
    want = values["loss/preference"] + alpha * (2 * half_nll[0] + 2 * half_nll[1]) / 4
    assert values["loss"] == pytest.approx(want, rel=1e-5)
    # (The token-weighted NLL over the whole step differs, the halves' chosen tokens being unequal.)
    assert values["nll_loss"] != pytest.approx(sum(half_nll) / 2, rel=1e-3)


@pytest.mark.parametrize("settings", [SimPOSettings(beta=2.0, simpo_gamma=0.5), ORPOSettings(beta=0.5),
                                      RPOSettings(beta=0.5, rpo_alpha=1.0)], ids=lambda s: s.kind)
def test_a_few_steps_lower_the_validation_loss(settings, start_params, reference_score):
    """Chosen responses follow the prompt's pattern, rejected ones are random; ~2 s per objective."""
    train = [single_micro_batch(with_reference_logps(dpo_batch(seed=400 + i, pairs=8), reference_score))
             for i in range(4)]
    val = single_micro_batch(with_reference_logps(dpo_batch(seed=500, pairs=16), reference_score))
    objective = partial(steps.dpo_objective, config=CONFIG, settings=settings)
    optimizer = optax.adam(3e-3)
    step = steps.jit_train_step(objective, optimizer)
    evaluate = steps.jit_eval_step(objective)
    state = steps.create_train_state(jax.tree.map(jnp.array, start_params), optimizer)
    before = finalize_metrics(evaluate(state.params, val))
    for index in range(16):
        state, _ = step(state, train[index % len(train)])
    after = finalize_metrics(evaluate(state.params, val))
    assert after["loss"] < before["loss"] - 0.05, (before, after)
    assert after["rewards/accuracies"] > before["rewards/accuracies"], (before, after)
    assert all(np.isfinite(v) for v in after.values())

# --- make-prefs and dpo without a reference -------------------------------------------------------


@pytest.fixture(scope="module")
def unscored_run(shared_data, tmp_path_factory):
    """make-prefs on 13 staged examples with a tiny model and `dpo.loss_type=simpo`: no reference
    scoring (about 20 s on 2 cores)."""
    root = tmp_path_factory.mktemp("unscored")
    train, val, dialogues = staged_slice(shared_data, root / "data")
    llama = tiny_llama_with_words(root, corpus_text(dialogues))
    config = write_config(root / "run.yaml", train=train, val=val, run_dir=root / "run", generator=llama,
                          reference=llama)
    assert make_prefs.main(["--config", str(config), "dpo.loss_type=simpo"]) == 0
    return SimpleNamespace(config=config, llama=llama, prefs=root / "run" / "prefs")


def test_make_prefs_scores_no_reference_for_an_objective_without_one(unscored_run):
    encoder = PromptEncoder(load_model(unscored_run.llama).tokenizer, "chat-en")
    records = [r for split in prefs.SPLITS for r in prefs.read_records(unscored_run.prefs, split)]
    assert len(records) == 13
    for record in records:
        assert record.ref_chosen_logp is None and record.ref_rejected_logp is None
        assert record.chosen_tokens == len(encoder.response_ids(record.chosen))
        assert record.rejected_tokens == len(encoder.response_ids(record.rejected))
        assert prefs.PreferenceRecord.from_json_line(record.to_json_line(), "here") == record
    assert json.loads((unscored_run.prefs / prefs.SETTINGS_FILE).read_text())["reference_scored"] is False


def test_a_folder_without_reference_logps_is_refused_to_an_objective_that_needs_them(unscored_run, capsys):
    assert cli.main(["make-prefs", "--config", str(unscored_run.config), "dpo.loss_type=rpo"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("pdpo make-prefs: ") and "carry no reference log-probs" in error
    assert error.count("\n") == 1
    assert cli.main(["dpo", "--config", str(unscored_run.config), "dpo.loss_type=sigmoid", "dpo.batch_size=8"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("pdpo dpo: ") and "has no reference log-probs" in error and error.count("\n") == 1


def test_a_scored_folder_serves_every_objective_and_old_folders_count_as_scored(unscored_run, tmp_path):
    folder = tmp_path / "prefs"
    shutil.copytree(unscored_run.prefs, folder)
    settings = json.loads((folder / prefs.SETTINGS_FILE).read_text())
    (folder / prefs.SETTINGS_FILE).write_text(json.dumps(dict(settings, reference_scored=True)))
    assert prefs.check_settings(folder, dict(settings, reference_scored=False))["reference_scored"] is True
    del settings["reference_scored"]  # a folder begun before the choice: its records were all scored
    (folder / prefs.SETTINGS_FILE).write_text(json.dumps(settings))
    assert prefs.check_settings(folder, dict(settings, reference_scored=True))["reference_scored"] is True


def test_dpo_trains_simpo_on_an_unscored_folder(unscored_run):
    """One SimPO step (about 15 s): no reference is read, and its start has no fixed value."""
    assert dpo.main(["--config", str(unscored_run.config), "dpo.loss_type=simpo", "dpo.beta=2.0",
                     "dpo.max_steps=1", "dpo.eval_every=1", "dpo.batch_size=8"]) == 0
    stage = unscored_run.prefs.parent / "dpo"
    summary = json.loads((stage / DONE_MARKER).read_text())
    assert summary["start_check"] == "not applicable"
    assert json.loads((stage / "data_summary.json").read_text())["objective"] == "simpo"
    val = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    val = [row for row in val if row.get("split") == "val"]
    assert val and all(np.isfinite(row["loss"]) for row in val)


# --- the paper variants ------------------------------------------------------------------------------

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"


@pytest.mark.parametrize("model_file", sorted(p.name for p in PAPER.glob("[!_]*.yaml")))
def test_the_objective_variants_stack_on_every_paper_model_file(model_file):
    base = load_config(PAPER / model_file)
    expected = {"simpo": (SimPOSettings(beta=2.0, simpo_gamma=1.0), False), "orpo": (ORPOSettings(beta=0.1), False),
                "rpo": (RPOSettings(beta=0.5, rpo_alpha=1.0), True)}
    for kind, (settings, scored) in expected.items():
        config = load_config([PAPER / model_file, PAPER / "variants" / f"{kind}.yaml"])
        assert config.run_dir == f"{base.run_dir}-{kind}"
        assert preference_settings(config.dpo.loss_type, **config.dpo.objective_settings()) == settings
        assert prefs.reference_needed(config) is scored
        assert config.dpo.optimizer == base.dpo.optimizer and config.prefs == base.prefs and config.sft == base.sft


def test_the_margin_filter_says_an_unscored_folder_has_no_reference_logps(unscored_run):
    from pdpo_jax.prefs.filters import MarginFilter

    records = prefs.read_records(unscored_run.prefs, "train")
    with pytest.raises(prefs.PrefsError, match="the margin filter needs reference log-probs"):
        MarginFilter(nats=1.0).objections(records)
