"""A tiny NLI classifier trained until it labels a given set of sentence pairs as told, for tests
whose outcome depends on what the classifier says (the nli pair filter, the C-score of responses).

The classifier is the project's own (`pdpo_jax.model.classifier`: a random tiny Llama trunk with
a word-level tokenizer and a `score` head), trained with Adam on those very pairs and saved as a
Hugging Face classifier directory; `train_tiny_classifier` checks that every pair gets its label,
so a test reads a known outcome from real classifier code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from data_fixtures import word_level_tokenizer
from model_fixtures import make_tiny_hf_model

NLI_MAX_LENGTH = 64


def train_tiny_classifier(root: Path, pairs: Sequence[tuple[str, str, str]], words: Sequence[str],
                          steps: int = 2000, seed: int = 0) -> Path:
    """(premise, hypothesis, label) pairs -> the directory of a classifier that predicts each label."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from pdpo_jax.data import NLI_LABELS
    from pdpo_jax.data.nli_batches import encode_pair, nli_batch
    from pdpo_jax.model import load_model, pad_id
    from pdpo_jax.model.classifier import Classifier, classifier_logits, save_classifier, with_classifier_head

    tokenizer = word_level_tokenizer([*words, *(p for p, _, _ in pairs), *(h for _, h, _ in pairs)], bos=True)
    trunk_dir = make_tiny_hf_model(root, "llama", seed=seed, name="nli-trunk", vocab_size=len(tokenizer), pad_token_id=0)
    tokenizer.save_pretrained(trunk_dir)
    trunk = load_model(trunk_dir)
    params = with_classifier_head(trunk.params, trunk.config, len(NLI_LABELS), seed=seed)
    encoded = [encode_pair(tokenizer, p, h, max_length=NLI_MAX_LENGTH, pad_id=pad_id(trunk),
                           label=NLI_LABELS.index(label)) for p, h, label in pairs]
    batch = nli_batch(encoded, max(map(len, encoded)), pad_id(trunk))
    inputs = {k: jnp.asarray(batch[k]) for k in ("input_ids", "positions", "segment_ids")}
    labels = jnp.asarray(batch["labels"])
    optimizer = optax.adam(5e-3)

    def loss_fn(p):
        logits = classifier_logits(p, trunk.config, inputs["input_ids"], inputs["positions"], inputs["segment_ids"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    @jax.jit
    def step(p, state):
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, logits

    state = optimizer.init(params)
    for _ in range(steps):
        updated, updated_state, logits = step(params, state)
        if bool((np.asarray(logits).argmax(-1) == np.asarray(labels)).all()):
            break  # `logits` are those of `params`, before this update: keep them
        params, state = updated, updated_state
    _, logits = loss_fn(params)
    predicted = [NLI_LABELS[i] for i in np.asarray(logits).argmax(-1)]
    assert predicted == [label for _, _, label in pairs], f"the tiny classifier did not learn its pairs: {predicted}"
    classifier = Classifier(trunk.config, params, trunk.tokenizer, trunk.path, NLI_LABELS)
    return save_classifier(root / "classifier", classifier)
