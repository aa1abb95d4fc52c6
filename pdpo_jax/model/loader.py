"""load_model: config, parameters and tokenizer of one Hugging Face directory in one call."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdpo_jax.model.checkpoint import load_hf
from pdpo_jax.model.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass
class LoadedModel:
    config: ModelConfig
    params: Any
    tokenizer: Any
    path: Path


def has_tokenizer_files(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in TOKENIZER_FILES)


def load_model(path: str | os.PathLike, *, dtype: Any = None, mesh: Any = None, allow_pickle: bool = False) -> LoadedModel:
    """`path` is a Hugging Face model directory, or "default" for the bundled model."""
    if os.fspath(path) == "default":
        from pdpo_jax.model.default_model import default_model_dir

        path = default_model_dir()
    model_dir = Path(path)
    config, params = load_hf(model_dir, dtype=dtype, shardings=mesh, allow_pickle=allow_pickle)
    tokenizer = None
    if has_tokenizer_files(model_dir):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.fspath(model_dir))
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, path=model_dir)
