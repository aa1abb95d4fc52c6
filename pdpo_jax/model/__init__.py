"""The decoder (GPT-2 and Llama families), its config, and Hugging Face checkpoint import/export."""

from pdpo_jax.model.checkpoint import load_hf, save_hf
from pdpo_jax.model.config import ModelConfig
from pdpo_jax.model.decoder import Decoder, init_cache, init_params, unembedding
from pdpo_jax.model.loader import LoadedModel, load_model

__all__ = [
    "Decoder", "LoadedModel", "ModelConfig", "init_cache", "init_params", "load_hf", "load_model",
    "save_hf", "unembedding",
]
