"""The package root's API, used the way a script would: each name imported from `pdpo_jax` and
checked against an independent computation (PyTorch transformers, or our own full forward)."""

from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import load_torch_model, make_tiny_hf_model, padded_batch, torch_logits
from prefs_fixtures import tiny_llama_with_words

import pdpo_jax
from pdpo_jax import scoring

LOGIT_TOL = 1e-4  # fp32, ours against transformers' eager attention
PERSONA = ["i like tea ."]
HISTORY = ["hi , do you like tea ?"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    words = ["i like tea . hi , do you like tea ? yes i do no i hate it coffee is fine"]
    return pdpo_jax.load_model(tiny_llama_with_words(tmp_path_factory.mktemp("api"), words))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_every_exported_name_resolves():
    for name in pdpo_jax.__all__:
        assert getattr(pdpo_jax, name) is not None, name
    with pytest.raises(AttributeError):
        pdpo_jax.no_such_name  # noqa: B018


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_forward_logits_match_transformers_with_left_padding(tmp_path, family):
    model_dir = make_tiny_hf_model(tmp_path, family)
    model = pdpo_jax.load_model(model_dir)
    assert isinstance(model, pdpo_jax.Model)
    batch = padded_batch([7, 3, 5], 7, left=True, seed=1)
    ours = pdpo_jax.forward_logits(model, batch["input_ids"], batch["attention_mask"])
    reference = torch_logits(load_torch_model(model_dir), batch["input_ids"], batch["attention_mask"], batch["positions"])
    real = batch["attention_mask"].astype(bool)
    assert ours.shape == reference.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours[real], reference[real], atol=LOGIT_TOL, rtol=0)


def test_generate_is_greedy_under_the_full_forward(chat_model):
    prompt = np.asarray([pdpo_jax.PromptEncoder(chat_model.tokenizer, "chat-en").prompt_ids(PERSONA, HISTORY)])
    tokens = pdpo_jax.generate(chat_model, prompt, np.ones_like(prompt), max_new_tokens=4, sampler=pdpo_jax.Greedy())
    ids = prompt
    for step in range(4):  # each token is the argmax of a full forward over prompt + the tokens before it
        logits = pdpo_jax.forward_logits(chat_model, ids)
        assert tokens[0, step] == int(np.argmax(logits[0, -1]))
        ids = np.concatenate([ids, tokens[:, step:step + 1]], axis=1)


def test_score_responses_sums_the_response_token_log_probs(chat_model):
    responses = ["yes i do .", "no i hate it ."]
    logps, counts = pdpo_jax.score_responses(chat_model, PERSONA, HISTORY, responses)
    encoder = pdpo_jax.PromptEncoder(chat_model.tokenizer, "chat-en")
    prompt = encoder.prompt_ids(PERSONA, HISTORY)
    for i, text in enumerate(responses):
        response = encoder.response_ids(text)  # with the end-of-turn ids, as training scores them
        ids = np.asarray([prompt + response])
        token_logps = log_softmax(pdpo_jax.forward_logits(chat_model, ids)[0].astype(np.float64))
        expected = sum(token_logps[len(prompt) + k - 1, token] for k, token in enumerate(response))
        assert counts[i] == len(response)
        np.testing.assert_allclose(logps[i], expected, atol=1e-4, rtol=0)


def test_repeated_scoring_compiles_once(chat_model):
    pdpo_jax.score_responses(chat_model, PERSONA, HISTORY, ["yes i do ."])
    before = scoring._jitted_sequence_scores.cache_info()
    pdpo_jax.score_responses(chat_model, PERSONA, HISTORY, ["no i hate it ."])
    after = scoring._jitted_sequence_scores.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 1


def test_respond_to_answers_with_the_greedy_continuation_cut_at_the_end_of_turn(chat_model):
    reply = pdpo_jax.respond_to(chat_model, PERSONA, HISTORY, max_new_tokens=6)
    assert isinstance(reply, pdpo_jax.Response)
    prompt = np.asarray([pdpo_jax.PromptEncoder(chat_model.tokenizer, "chat-en").prompt_ids(PERSONA, HISTORY)])
    tokens = pdpo_jax.generate(chat_model, prompt, np.ones_like(prompt), max_new_tokens=6)[0].tolist()
    assert list(reply.token_ids) == tokens[: len(reply.token_ids)]
    assert reply.stopped == (len(reply.token_ids) < 6)
    assert reply.text == chat_model.tokenizer.decode(list(reply.token_ids), skip_special_tokens=True).strip()
    with pytest.raises(pdpo_jax.PdpoError, match="no room"):
        pdpo_jax.respond_to(chat_model, PERSONA, HISTORY, max_new_tokens=6, max_length=4)


def test_preference_loss_takes_plain_arrays_and_matches_the_formula():
    # SimPO on three pairs, written out with numpy: mean over pairs of -log σ(β (c/n_c - r/n_r) - γ).
    chosen, rejected = np.array([-6.0, -10.0, -2.5]), np.array([-12.0, -4.0, -9.0])
    chosen_tokens, rejected_tokens = np.array([3, 5, 1]), np.array([4, 2, 6])
    loss, metrics = pdpo_jax.preference_loss("simpo", chosen, rejected, chosen_tokens=chosen_tokens,
                                             rejected_tokens=rejected_tokens, beta=2.0, simpo_gamma=0.5)
    z = 2.0 * (chosen / chosen_tokens - rejected / rejected_tokens) - 0.5
    assert float(loss) == pytest.approx(np.mean(np.log1p(np.exp(-z))), abs=1e-6)
    total, count = metrics["rewards/accuracies"]
    assert float(total) / float(count) == pytest.approx(np.mean(z + 0.5 > 0))
