"""The decoder (one module per model family under `families/`), its config, loading, and Hugging
Face import/export."""

# The bundled families register themselves first, so every module below can look them up.
from pdpo_jax.model import families  # noqa: F401
from pdpo_jax.model.checkpoint import load_hf, save_hf
from pdpo_jax.model.config import ModelConfig
from pdpo_jax.model.decoder import Decoder, init_cache, init_params, unembedding
from pdpo_jax.model.loader import Model, eos_ids, load_model, pad_id, require_tokenizer

__all__ = [
    "Decoder", "Model", "ModelConfig", "eos_ids", "init_cache", "init_params", "load_hf", "load_model",
    "pad_id", "require_tokenizer", "save_hf", "unembedding",
]
