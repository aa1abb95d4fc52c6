"""A decoder trunk with a sequence-classification head, as transformers' *ForSequenceClassification.

The head is one bias-free linear map, `score`, from the final-norm hidden state of a row's last
token to the class logits (GPT2ForSequenceClassification, LlamaForSequenceClassification and the
Mistral and Qwen2 ones all do this; each model family names its class). The parameters are the
decoder's without `lm_head`, plus `score/kernel` `[hidden, num_labels]`. On disk a classifier is a Hugging Face directory whose
config.json names the *ForSequenceClassification architecture, `id2label`, `label2id` and a
`pad_token_id`, with `score.weight` beside the trunk's tensors, so
`AutoModelForSequenceClassification.from_pretrained` loads it; while training it is the orbax
`params/` of `pdpo_jax.model.model_dir` beside that same config.json. `load_classifier` opens both.

transformers reads the class at the rightmost token that is not `pad_token_id`; here it is the last
token of the row's segment. They are the same token as long as an input never ends in the pad id,
which the pair encoding (`pdpo_jax.data.nli_batches`) guarantees.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from pdpo_jax.errors import ModelDirError
from pdpo_jax.storage import atomic_write_json
from pdpo_jax.projection import matmul_last_axis
from pdpo_jax.model.checkpoint import CONFIG_FILE, save_hf
from pdpo_jax.model.config import ModelConfig
from pdpo_jax.model.decoder import Decoder
from pdpo_jax.model.family import CLASSIFIER_HEAD, LM_HEAD, family_for
from pdpo_jax.model.loader import Model, load_model, pad_id, resolve_model_dir
from pdpo_jax.model.model_dir import copy_model_files
from pdpo_jax.object_store import as_path

HEAD_INIT_STD = 0.02  # transformers' initializer_range, which initialises `score` in PyTorch too


@dataclass
class Classifier(Model):
    """A loaded sequence classifier: a Model whose `params` carry the `score` head instead of
    `lm_head`, and the class names in the order of the logits."""

    labels: tuple[str, ...] = ()


def last_token_hidden(hidden: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """`[batch, hidden]`: the state at each row's last non-padding position."""
    filled = (segment_ids != 0).astype(jnp.int32)
    last = filled.shape[1] - 1 - jnp.argmax(filled[:, ::-1], axis=1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def classifier_logits(params: Any, config: ModelConfig, input_ids: jax.Array, positions: jax.Array,
                      segment_ids: jax.Array) -> jax.Array:
    """fp32 `[batch, num_labels]` class logits of right- or left-padded rows (`segment_ids` 0 = padding)."""
    hidden, _ = Decoder(config).apply({"params": params}, input_ids, positions, segment_ids, return_hidden=True)
    pooled = last_token_hidden(hidden, segment_ids)
    kernel = params["score"]["kernel"]
    return matmul_last_axis(pooled, kernel.astype(pooled.dtype), preferred_element_type=jnp.float32)


def with_classifier_head(lm_params: Any, config: ModelConfig, num_labels: int, seed: int = 0) -> Any:
    """A new classifier on a causal LM's trunk: `lm_head` dropped, `score` drawn from N(0, 0.02)."""
    params = {name: subtree for name, subtree in lm_params.items() if name != LM_HEAD.split("/")[0]}
    kernel = HEAD_INIT_STD * jax.random.normal(jax.random.PRNGKey(seed), (config.hidden_size, num_labels), jnp.float32)
    return params | {CLASSIFIER_HEAD.flax.split("/")[0]: {"kernel": kernel}}


def classifier_hf_config(config: ModelConfig, labels: tuple[str, ...], pad_token_id: int) -> dict[str, Any]:
    """The config.json of a classifier on `config`'s trunk, in the layout transformers reads."""
    architecture = family_for(config).architectures[config.model_type].sequence_classifier
    if architecture is None:
        raise ModelDirError(f"model type {config.model_type!r} has no sequence-classification architecture here")
    return config.to_hf() | {
        "architectures": [architecture],
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
        "pad_token_id": int(pad_token_id),
        "problem_type": "single_label_classification",
    }


def read_labels(model_dir: str | os.PathLike) -> tuple[str, ...]:
    """The class names of a classifier directory, from `id2label` in its config.json."""
    path = as_path(model_dir) / CONFIG_FILE
    try:
        id2label = json.loads(path.read_text(encoding="utf-8")).get("id2label")
    except (OSError, json.JSONDecodeError) as err:
        raise ModelDirError(f"{path}: cannot read ({err})") from None
    if not isinstance(id2label, dict) or not id2label:
        raise ModelDirError(f"{path}: no 'id2label' mapping; this is not a sequence classifier "
                            "(train one with `pdpo train-nli`)")
    try:
        by_index = {int(index): str(label) for index, label in id2label.items()}
    except ValueError:
        raise ModelDirError(f"{path}: key 'id2label' must map class indices to names, got {id2label!r}") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise ModelDirError(f"{path}: key 'id2label' must number its classes 0..{len(by_index) - 1}, got {sorted(by_index)}")
    return tuple(by_index[i] for i in range(len(by_index)))


def load_classifier(path: str | os.PathLike, *, mesh: Any = None, compute_dtype: str | None = None,
                    remat: bool | None = None, scan_layers: bool | None = None) -> Classifier:
    """The classifier at `path` (a Hugging Face directory, or a `pdpo train-nli` stage's `best/`),
    placed like `load_model` places a model; it must come with its tokenizer."""
    model_dir = resolve_model_dir(path)
    labels = read_labels(model_dir)
    model = load_model(model_dir, mesh=mesh, compute_dtype=compute_dtype, remat=remat, scan_layers=scan_layers,
                       num_labels=len(labels))
    if model.tokenizer is None:
        raise ModelDirError(f"{model_dir}: no tokenizer files next to the classifier")
    return Classifier(model.config, model.params, model.tokenizer, model.path, labels)


def write_classifier_files(out_dir: str | os.PathLike, trunk: Model, labels: tuple[str, ...]) -> Path:
    """A directory with a classifier's config.json and the trunk's tokenizer files, no weights: what
    training copies beside the parameters it saves (see `pdpo_jax.train.checkpoints`)."""
    out_dir = as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_model_files(trunk.path, out_dir)
    atomic_write_json(out_dir / CONFIG_FILE, classifier_hf_config(trunk.config, labels, pad_id(trunk)))
    return out_dir


def save_classifier(out_dir: str | os.PathLike, classifier: Classifier) -> Path:
    """`classifier` as a Hugging Face directory that `AutoModelForSequenceClassification` loads
    (fp32 safetensors, config.json, tokenizer), replaced atomically; process 0 writes it."""
    config = classifier.config.replace(dtype="float32", remat=False)
    hf_config = classifier_hf_config(config, classifier.labels, pad_id(classifier))
    return save_hf(out_dir, config, classifier.params, tokenizer=classifier.tokenizer, hf_config=hf_config,
                   num_labels=len(classifier.labels))
