"""The sequence classifier and the NLI reward against PyTorch transformers: a saved classifier loads
in `AutoModelForSequenceClassification` with our logits, both on-disk layouts load back, the
batched probabilities (also on a mesh) equal transformers' one pair at a time, and NliReward's
sentence selection equals a plain-numpy reading of Song et al.'s rule on those probabilities."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util
from data_fixtures import word_level_tokenizer
from model_fixtures import make_tiny_hf_model

from pdpo_jax import parallel
from pdpo_jax.data import NLI_LABELS
from pdpo_jax.data.nli_batches import encode_pair, nli_batch
from pdpo_jax.model import load_model, pad_id
from pdpo_jax.model.classifier import (
    Classifier,
    classifier_logits,
    load_classifier,
    save_classifier,
    with_classifier_head,
    write_classifier_files,
)
from pdpo_jax.model.model_dir import write_params
from pdpo_jax.nli import NliReward, class_probabilities

PERSONAS = [("i have two dogs .", "i love to swim .", "my favorite color is red ."),
            ("i am a teacher .",),
            ()]
RESPONSES = ["i do not have any dogs , i have a cat .", "i teach math at school .", "hello there ."]
WORDS = [s for p in PERSONAS for s in p] + RESPONSES + ["i like red dogs and cats"]


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """family -> (a random tiny trunk with a new head, the Hugging Face classifier directory it was saved as)."""
    built = {}

    def get(family: str):
        if family not in built:
            built[family] = build_classifier(tmp_path_factory.mktemp(f"classifier-{family}"), family)
        return built[family]

    return get


@pytest.fixture(params=["llama", "gpt2"])
def saved_classifier(request, classifiers):
    return classifiers(request.param)


@pytest.fixture
def llama_classifier(classifiers):
    return classifiers("llama")


def build_classifier(root, family: str):
    tokenizer = word_level_tokenizer(WORDS, bos=family == "llama")
    trunk_dir = make_tiny_hf_model(root, family, vocab_size=len(tokenizer), pad_token_id=0,
                                   tie_word_embeddings=family == "gpt2")
    tokenizer.save_pretrained(trunk_dir)
    trunk = load_model(trunk_dir)
    params = with_classifier_head(trunk.params, trunk.config, len(NLI_LABELS), seed=3)
    classifier = Classifier(trunk.config, params, trunk.tokenizer, trunk.path, NLI_LABELS)
    out = save_classifier(root / "classifier", classifier)
    return classifier, out


def torch_classifier(path):
    import transformers

    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation="eager", dtype="float32").eval()


def encoded_pairs(classifier):
    return [encode_pair(classifier.tokenizer, sentence, response, max_length=64, pad_id=pad_id(classifier))
            for persona, response in zip(PERSONAS, RESPONSES) for sentence in persona]


def test_transformers_loads_the_saved_classifier_with_our_logits(saved_classifier):
    import torch

    classifier, path = saved_classifier
    torch_model = torch_classifier(path)
    assert type(torch_model).__name__.endswith("ForSequenceClassification")
    assert torch_model.config.id2label == dict(enumerate(NLI_LABELS)) and torch_model.config.num_labels == 3
    pairs = encoded_pairs(classifier)
    batch = nli_batch(pairs, length=max(len(p) for p in pairs) + 3, pad_id=pad_id(classifier))  # right padding
    ours = classifier_logits(classifier.params, classifier.config, batch["input_ids"], batch["positions"],
                             batch["segment_ids"])
    with torch.no_grad():  # transformers finds each row's last token itself, from pad_token_id
        theirs = torch_model(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
                             attention_mask=torch.as_tensor(batch["segment_ids"], dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-5, rtol=0)


def test_both_layouts_load_back_unchanged(saved_classifier, tmp_path):
    classifier, path = saved_classifier
    from_hf = load_classifier(path)
    assert from_hf.labels == NLI_LABELS and from_hf.tokenizer is not None
    orbax_dir = write_classifier_files(tmp_path / "best", load_model(classifier.path), NLI_LABELS)
    write_params(orbax_dir, classifier.params)  # what training writes: orbax params beside the classifier config
    from_orbax = load_classifier(orbax_dir)
    expected = traverse_util.flatten_dict(classifier.params, sep="/")
    for loaded in (from_hf, from_orbax):
        flat = traverse_util.flatten_dict(loaded.params, sep="/")
        assert sorted(flat) == sorted(expected) and "score/kernel" in flat
        for name, value in expected.items():
            np.testing.assert_array_equal(np.asarray(flat[name]), np.asarray(value), err_msg=name)


def test_batched_probabilities_on_a_mesh_equal_transformers_pair_by_pair(llama_classifier):
    import torch

    classifier, path = llama_classifier
    torch_model = torch_classifier(path)
    pairs = encoded_pairs(classifier)
    with torch.no_grad():
        expected = np.stack([torch.softmax(torch_model(input_ids=torch.as_tensor([p.ids])).logits[0], -1).numpy()
                             for p in pairs])
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=1, devices=jax.devices()[:4])
    sharded = load_classifier(path, mesh=mesh)
    for probabilities in (class_probabilities(classifier, pairs, rows=3, bucket=8),
                          class_probabilities(sharded, pairs, rows=3, bucket=8, mesh=mesh)):
        np.testing.assert_allclose(probabilities, expected, atol=2e-6)


def song_reward(probabilities: np.ndarray, mode: str) -> float:
    """The rule written out: contradiction is column 0, entailment column 2 (NLI_LABELS)."""
    if not len(probabilities):
        return 0.0
    if mode == "entailment":
        return max(row[2] for row in probabilities)
    kept = max(range(len(probabilities)), key=lambda i: (probabilities[i][0], -i))
    return probabilities[kept][2] - (probabilities[kept][0] if mode == "entail_minus_contradict" else 0.0)


@pytest.mark.parametrize("mode", ["song", "entail_minus_contradict", "entailment"])
def test_nli_reward_selects_the_most_contradicted_sentence(llama_classifier, mode):
    classifier, _ = llama_classifier
    reward = NliReward(classifier, mode, max_length=64, rows=3, bucket=8)
    per_sentence = reward.sentence_probabilities(PERSONAS, RESPONSES)
    assert [len(p) for p in per_sentence] == [3, 1, 0]
    np.testing.assert_allclose(np.concatenate(per_sentence),
                               class_probabilities(classifier, encoded_pairs(classifier), rows=3, bucket=8), atol=1e-6)
    np.testing.assert_allclose(reward(PERSONAS, RESPONSES), [song_reward(p, mode) for p in per_sentence], atol=1e-6)


def test_a_reward_needs_contradiction_and_entailment_classes(llama_classifier):
    classifier, _ = llama_classifier
    binary = Classifier(classifier.config, classifier.params, classifier.tokenizer, classifier.path, ("no", "yes", "x"))
    with pytest.raises(ValueError, match="lack"):
        NliReward(binary)
    with pytest.raises(ValueError, match="unknown NLI reward mode"):
        NliReward(classifier, "max")
