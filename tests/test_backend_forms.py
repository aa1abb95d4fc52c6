"""Each CPU-tuned form against its textbook form (pdpo_jax.backend_forms), both run on CPU, and
which form a compilation for each backend gets."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from pdpo_jax.backend_forms import forced_form
from pdpo_jax.generation import sampling
from pdpo_jax.generation.sampling import NUCLEUS_CANDIDATES, Greedy, Temperature, TopK, TopP, draw, first_argmax
from pdpo_jax.model.decoder import grouped_attention

# fp32 scores of 32-term dot products summed in another order, then softmax and a weighted sum of
# values of size ~1: the two forms differ by a few float32 ulps
ATTENTION_TOL = 1e-5
P_ONE_TAIL = 1e-5  # at p = 1: ~5x the typical float32 rounding of a sum of 1000 probabilities (sqrt(1000) * 6e-8)
CHI_SQUARE_ALPHA = 1e-3  # a correct form fails a fixed-seed distribution test with this probability
DRAWS = 40_000
SAMPLERS = [Greedy(), Temperature(0.8), TopK(20), TopP(0.9)]
ARGMAX = re.compile(r"stablehlo\.reduce\([^)]*\), \(")  # a reduction over (value, index) pairs


def in_form(form, fn, *args):
    with forced_form(form):
        return np.asarray(fn(*args))


def test_one_token_attention_forms_agree():
    rng = np.random.default_rng(0)
    batch, heads, kv_heads, slots, head_dim = 5, 8, 2, 23, 32
    q = jnp.asarray(rng.normal(size=(batch, 1, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(batch, kv_heads, slots, head_dim)), jnp.float32) for _ in range(2))
    mask = rng.random((batch, 1, slots)) < 0.6
    mask[:, :, 0] = True
    mask[-1] = False  # a padding row: every slot masked
    mask = jnp.asarray(mask)
    tuned = in_form("cpu-tuned", grouped_attention, q, k, v, mask)
    textbook = in_form("textbook", grouped_attention, q, k, v, mask)
    np.testing.assert_allclose(tuned, textbook, atol=ATTENTION_TOL, rtol=ATTENTION_TOL)
    assert np.abs(textbook).max() > 0.1  # the outputs are not trivially small


@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_greedy_forms_pick_the_first_largest(kind):
    rng = np.random.default_rng(1)
    if kind == "normal":
        logits = rng.normal(size=(32, 5000)).astype(np.float32)
    else:  # few distinct values, so most rows have a tie for the largest
        logits = rng.integers(0, 4, size=(64, 40)).astype(np.float32)
        logits[:8, 5:] = -np.inf
        assert ((logits == logits.max(-1, keepdims=True)).sum(-1) > 1).mean() > 0.5
    expected = np.argmax(logits, axis=-1)  # numpy: the first index on ties
    for form in ("cpu-tuned", "textbook"):
        np.testing.assert_array_equal(in_form(form, first_argmax, jnp.asarray(logits)), expected)


def recorded_nucleus(form: str, sampler: TopP, logits: np.ndarray, monkeypatch) -> tuple[np.ndarray, int]:
    """(bool `[batch, vocab]`: the tokens with non-zero weight in what `sampler.choose` hands its
    draw, the number of entries it handed: NUCLEUS_CANDIDATES or the vocabulary)."""
    seen = []

    def recording(real):
        def draw_and_record(weights, key):
            jax.debug.callback(lambda w: seen.append(np.asarray(w)), weights)  # only the branch that runs
            return real(weights, key)
        return draw_and_record

    with monkeypatch.context() as patch:
        for name in ("inverse_cdf_draw", "categorical_draw"):
            patch.setattr(sampling, name, recording(getattr(sampling, name)))
        in_form(form, sampler.choose, jnp.asarray(logits), jax.random.PRNGKey(0))
    (weights,) = seen
    width = weights.shape[-1]
    if form == "cpu-tuned" and width == logits.shape[-1]:  # the bisection: weights over the vocabulary
        return weights > 0, width
    # the weights of the most likely tokens in order, ties ranked by index (as lax.top_k and a stable sort rank them)
    order = np.argsort(-np.asarray(jax.nn.softmax(logits / sampler.temperature)), axis=-1, kind="stable")
    nucleus = np.zeros(logits.shape, bool)
    np.put_along_axis(nucleus, order[:, :width], weights > 0, axis=-1)
    return nucleus, width


VOCAB = 1000  # more than NUCLEUS_CANDIDATES, so the CPU form can take either of its paths
LOGITS = {
    "normal": np.random.default_rng(2).normal(0, 2.0, size=(16, VOCAB)).astype(np.float32),
    "peaked": (np.random.default_rng(3).normal(0, 1.0, size=(16, VOCAB)) + 12.0 * np.eye(16, VOCAB)).astype(np.float32),
    "flat": np.random.default_rng(4).normal(0, 0.5, size=(16, VOCAB)).astype(np.float32),
}


@pytest.mark.parametrize("logits_kind", sorted(LOGITS))
def test_top_p_forms_keep_the_same_nucleus(logits_kind, monkeypatch):
    logits = LOGITS[logits_kind]
    cpu_paths = set()
    for p in (0.05, 0.6, 0.9, 1.0):
        for temperature in (0.5, 1.7):
            sampler = TopP(p, temperature)
            tuned, width = recorded_nucleus("cpu-tuned", sampler, logits, monkeypatch)
            textbook, _ = recorded_nucleus("textbook", sampler, logits, monkeypatch)
            cpu_paths.add("candidates" if width == NUCLEUS_CANDIDATES else "vocabulary")
            assert textbook.sum(-1).min() >= 1  # the top token is always kept
            if p < 1:
                np.testing.assert_array_equal(tuned, textbook, err_msg=f"p={p} temperature={temperature}")
                continue
            # where a float32 sum of all the probabilities reaches 1 is rounding: at p = 1 the forms
            # may differ by tail tokens whose mass that rounding does not see
            probs = scipy.special.softmax(logits.astype(np.float64) / temperature, axis=-1)
            assert (np.where(tuned != textbook, probs, 0).sum(-1) < P_ONE_TAIL).all()
            assert all((np.where(kept, probs, 0).sum(-1) > 1 - P_ONE_TAIL).all() for kept in (tuned, textbook))
    if logits_kind == "flat":  # both of the CPU form's paths are compared
        assert cpu_paths == {"candidates", "vocabulary"}


def draw_counts(form: str, choose, row: np.ndarray, seed: int) -> np.ndarray:
    """How often `choose` picks each entry in DRAWS copies of `row` (weights or logits)."""
    rows = jnp.asarray(np.tile(row, (DRAWS, 1)), jnp.float32)
    return np.bincount(in_form(form, choose, rows, jax.random.PRNGKey(seed)), minlength=row.size)


def fits(counts: np.ndarray, probs: np.ndarray) -> float:
    """The chi-square goodness-of-fit p-value of `counts` against `probs`, over the entries `probs` allows."""
    assert (counts[probs == 0] == 0).all(), "an entry of probability 0 was drawn"
    allowed = probs > 0
    return scipy.stats.chisquare(counts[allowed], probs[allowed] * counts.sum()).pvalue


def test_draw_forms_sample_the_same_distribution():
    weights = np.array([3.0, 0.0, 0.4, 2.1, 1.2, 0.0, 2.6, 0.1, 0.6])  # unnormalised, with zeros inside
    probs = weights / weights.sum()
    tuned, textbook = (draw_counts(form, draw, weights, seed=5) for form in ("cpu-tuned", "textbook"))
    assert fits(tuned, probs) > CHI_SQUARE_ALPHA and fits(textbook, probs) > CHI_SQUARE_ALPHA
    allowed = probs > 0
    assert scipy.stats.chi2_contingency(np.stack([tuned[allowed], textbook[allowed]])).pvalue > CHI_SQUARE_ALPHA
    # the test has power: 1% of the mass moved from the first entry to the third is rejected
    shifted = probs.copy()
    shifted[0] -= 0.01
    shifted[2] += 0.01
    assert fits(tuned, shifted) < 1e-6 and fits(textbook, shifted) < 1e-6


def test_top_p_forms_draw_from_the_renormalised_nucleus():
    logits = np.random.default_rng(6).normal(0, 1.5, size=12)
    probs = scipy.special.softmax(logits)
    ranked = np.argsort(-probs)
    keep = ranked[np.cumsum(probs[ranked]) - probs[ranked] < 0.8]
    nucleus = np.zeros_like(probs)
    nucleus[keep] = probs[keep] / probs[keep].sum()
    assert 2 < len(keep) < len(probs)
    for form in ("cpu-tuned", "textbook"):
        counts = draw_counts(form, TopP(0.8).choose, logits, seed=7)
        assert fits(counts, nucleus) > CHI_SQUARE_ALPHA, form
        assert fits(counts, probs) < 1e-6  # the test has power: the draws do not follow the whole softmax


def lowered(fn, *args, platform: str) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: type(s).__name__)
def test_each_backend_compiles_its_samplers_form(sampler):
    """CPU: no sort and no (value, index) argmax reduction; TPU and GPU: the textbook argmax (greedy
    and `jax.random.categorical`) and, for top-p, a sort."""
    args = (jnp.zeros((4, 1000), jnp.float32), jax.random.PRNGKey(0))

    def textbook(text: str) -> bool:
        return bool(ARGMAX.search(text)) and ("stablehlo.sort" in text) == isinstance(sampler, TopP)

    cpu = lowered(sampler.choose, *args, platform="cpu")
    assert "stablehlo.sort" not in cpu and not ARGMAX.search(cpu)
    assert textbook(lowered(sampler.choose, *args, platform="tpu"))
    assert textbook(lowered(sampler.choose, *args, platform="cuda"))
    with forced_form("textbook"):  # forcing reaches the CPU compilation, and only inside the block
        assert textbook(lowered(sampler.choose, *args, platform="cpu"))
    assert lowered(sampler.choose, *args, platform="cpu") == cpu


def test_each_backend_compiles_its_attention_form():
    """The one-token fp32 attention scores: a multiply-and-sum on CPU, a second matmul on TPU and GPU."""
    q, k = jnp.zeros((2, 1, 4, 16), jnp.float32), jnp.zeros((2, 2, 9, 16), jnp.float32)
    mask = jnp.ones((2, 1, 9), bool)
    matmuls = {platform: lowered(grouped_attention, q, k, k, mask, platform=platform).count("stablehlo.dot_general")
               for platform in ("cpu", "tpu", "cuda")}
    assert matmuls == {"cpu": 1, "tpu": 2, "cuda": 2}
    prompt = jnp.zeros((2, 3, 4, 16), jnp.float32), jnp.ones((2, 3, 9), bool)  # several tokens: matmuls everywhere
    assert lowered(grouped_attention, prompt[0], k, k, prompt[1], platform="cpu").count("stablehlo.dot_general") == 2


def test_an_unknown_form_is_refused():
    with pytest.raises(ValueError, match="form must be one of"):
        with forced_form("fast"):
            pass
