"""Our decoder against PyTorch transformers on tiny random models, plus cache and branch-mask rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_fixtures import load_torch_model, make_tiny_hf_model, padded_batch, torch_logits
from pdpo_jax.model import Decoder, init_cache, load_hf, unembedding

PARITY_TOL = 1e-4  # fp32, different op order than torch
CACHE_TOL = 1e-5

MODELS = {
    "gpt2": ("gpt2", {}),
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_rope_llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
                                    "rope_theta": 500.0}),
    "llama_rope_linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mistral_window": ("mistral", {"sliding_window": 5}),
    "qwen2_bias": ("qwen2", {}),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {name: make_tiny_hf_model(root, family, name=name, **kw) for name, (family, kw) in MODELS.items()}


def forward(config, params, batch, **kwargs):
    return Decoder(config).apply({"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"], **kwargs)


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(tiny_models, name, left):
    config, params = load_hf(tiny_models[name])
    batch = padded_batch([12, 7, 3], 12, left=left, seed=1)
    expected = torch_logits(load_torch_model(tiny_models[name]), batch["input_ids"], batch["attention_mask"], batch["positions"])
    logits, cache = forward(config, params, batch)
    assert logits.dtype == jnp.float32 and cache is None
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], expected[valid], atol=PARITY_TOL, rtol=0)


def test_sliding_window_changes_logits(tiny_models):
    """Guards the Mistral parity test: the window (5 < 12 tokens) must actually matter."""
    config, params = load_hf(tiny_models["mistral_window"])
    batch = padded_batch([12], 12, seed=1)
    windowed, _ = forward(config, params, batch)
    full, _ = forward(config.replace(sliding_window=None), params, batch)
    assert np.abs(np.asarray(windowed)[0, :5] - np.asarray(full)[0, :5]).max() < 1e-6
    assert np.abs(np.asarray(windowed)[0, 6:] - np.asarray(full)[0, 6:]).max() > 1e-3


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral_window"])
def test_prefill_then_decode_equals_full_forward(tiny_models, name):
    config, params = load_hf(tiny_models[name])
    batch = padded_batch([10, 10], 10, seed=2)
    full, _ = forward(config, params, batch)
    apply = jax.jit(Decoder(config).apply)
    cache = init_cache(config, batch_size=2, max_length=16)
    prefill = {k: v[:, :6] for k, v in batch.items()}
    logits, cache = apply({"params": params}, prefill["input_ids"], prefill["positions"], prefill["segment_ids"], cache=cache)
    steps = [logits]
    for t in range(6, 10):
        step = {k: v[:, t:t + 1] for k, v in batch.items()}
        logits, cache = apply({"params": params}, step["input_ids"], step["positions"], step["segment_ids"], cache=cache)
        steps.append(logits)
    assert int(cache["index"]) == 10
    np.testing.assert_array_equal(np.asarray(cache["segment_ids"])[:, 10:], 0)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full), atol=CACHE_TOL, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral_window"])
def test_rows_that_each_write_at_their_own_column_decode_as_their_full_forward(tiny_models, name):
    """A cache whose rows each have their own write index (`index` `[batch]`, as serving's slots
    are batched): two prompts of different lengths, prefilled apart, then decoded together."""
    config, params = load_hf(tiny_models[name])
    batch = {key: np.asarray(value) for key, value in padded_batch([10, 10], 10, seed=3).items()}
    full, _ = forward(config, params, batch)
    apply = jax.jit(Decoder(config).apply)
    starts = np.array([6, 3])
    caches = []
    for row, length in enumerate(starts):
        part = {key: value[row:row + 1, :length] for key, value in batch.items()}
        _, cache = apply({"params": params}, part["input_ids"], part["positions"], part["segment_ids"],
                         cache=init_cache(config, batch_size=1, max_length=16))
        caches.append(cache)
    cache = jax.tree.map(lambda *rows: jnp.concatenate(rows) if rows[0].ndim else jnp.stack(rows), *caches)
    for step in range(4):
        at = starts + step
        column = {key: value[np.arange(2), at][:, None] for key, value in batch.items()}
        logits, cache = apply({"params": params}, column["input_ids"], column["positions"], column["segment_ids"],
                              cache=cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], np.asarray(full)[np.arange(2), at], atol=CACHE_TOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache["index"]), starts + 4)
    np.testing.assert_array_equal(np.asarray(cache["segment_ids"])[1, 7:], 0)  # row 1 wrote columns 0-6 only


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_branch_sees_trunk_but_not_sibling(tiny_models, name):
    """[trunk | branch1 | branch2]: branch-2 logits equal those of an unbranched [trunk | branch2] row."""
    config, params = load_hf(tiny_models[name])
    rng = np.random.default_rng(3)
    trunk, b1, b2 = (rng.integers(3, 128, n).astype(np.int32) for n in (5, 4, 3))
    ids = np.concatenate([trunk, b1, b2])[None]
    positions = np.concatenate([np.arange(5), 5 + np.arange(4), 5 + np.arange(3)])[None].astype(np.int32)
    branches = np.array([[0] * 5 + [1] * 4 + [2] * 3], np.int32)
    branched, _ = Decoder(config).apply({"params": params}, ids, positions, np.ones_like(ids), branch_ids=branches)
    plain_ids = np.concatenate([trunk, b2])[None]
    plain, _ = Decoder(config).apply({"params": params}, plain_ids, np.arange(8, dtype=np.int32)[None], np.ones_like(plain_ids))
    np.testing.assert_allclose(np.asarray(branched)[0, 9:], np.asarray(plain)[0, 5:], atol=CACHE_TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(branched)[0, :5], np.asarray(plain)[0, :5], atol=CACHE_TOL, rtol=0)


def test_packed_segments_do_not_see_each_other(tiny_models):
    config, params = load_hf(tiny_models["llama"])
    rng = np.random.default_rng(4)
    a, b = rng.integers(3, 128, 6).astype(np.int32), rng.integers(3, 128, 4).astype(np.int32)
    packed = np.concatenate([a, b])[None]
    positions = np.concatenate([np.arange(6), np.arange(4)])[None].astype(np.int32)
    segments = np.array([[1] * 6 + [2] * 4], np.int32)
    logits, _ = Decoder(config).apply({"params": params}, packed, positions, segments)
    alone, _ = Decoder(config).apply({"params": params}, b[None], np.arange(4, dtype=np.int32)[None], np.ones((1, 4), np.int32))
    np.testing.assert_allclose(np.asarray(logits)[0, 6:], np.asarray(alone)[0], atol=CACHE_TOL, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama_tied"])
def test_hidden_times_unembedding_gives_logits(tiny_models, name):
    config, params = load_hf(tiny_models[name])
    batch = padded_batch([8, 5], 8, seed=5)
    logits, _ = forward(config, params, batch)
    hidden, _ = forward(config, params, batch, return_hidden=True)
    assert hidden.shape == (2, 8, config.hidden_size)
    np.testing.assert_allclose(np.asarray(hidden @ unembedding(params, config)), np.asarray(logits), atol=1e-5, rtol=0)


def test_remat_and_bfloat16(tiny_models):
    config, params = load_hf(tiny_models["llama"])
    batch = padded_batch([8, 5], 8, seed=6)
    reference, _ = forward(config, params, batch)

    def loss(p, cfg):
        logits, _ = forward(cfg, p, batch)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    grads = jax.grad(loss)(params, config)
    remat_grads = jax.grad(loss)(params, config.replace(remat=True))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(np.asarray(r), np.asarray(g), atol=1e-6, rtol=1e-5)

    low, _ = forward(config.replace(dtype="bfloat16"), params, batch)
    assert low.dtype == jnp.float32
    valid = batch["segment_ids"].astype(bool)
    assert np.abs(np.asarray(low)[valid] - np.asarray(reference)[valid]).max() < 0.1
