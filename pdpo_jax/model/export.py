"""Export: any model `load_model` opens (a training stage's `best/`, an HF directory,
`default`) written as a Hugging Face directory that `AutoModelForCausalLM.from_pretrained` loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pdpo_jax.model.checkpoint import save_hf
from pdpo_jax.model.loader import load_model

GENERATION_CONFIG = "generation_config.json"


def parse_size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "B": 1}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def export_hf(model_path: str | Path, out_dir: str | Path, *, max_shard_bytes: int = 2 * 1024**3,
              mesh: Any = None) -> Path:
    """Writes the model at `model_path` to `out_dir`. With `mesh` the weights are read onto it
    (never whole on one device) and gathered one tensor at a time; process 0 alone writes."""
    model = load_model(model_path, mesh=mesh)
    source_generation = Path(model.path) / GENERATION_CONFIG
    generation = json.loads(source_generation.read_text()) if source_generation.is_file() else None
    return save_hf(out_dir, model.config.replace(dtype="float32", remat=False), model.params,
                   tokenizer=model.tokenizer, max_shard_bytes=max_shard_bytes, generation_config=generation)
