"""The published `config.json` of every paper model, shipped with the package.

The paper configs name Hugging Face hub models (`meta-llama/Llama-2-13b-hf`, ...) that may not be
downloadable where a run is planned. Their architecture is a public fact, so the package carries
each model's `config.json` values under `resources/architectures/<owner>--<name>.json`, read by
`ModelConfig.from_hf` exactly like a downloaded file. Each file's `_provenance` says where its
values were checked (docs/pods.md lists them).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from pdpo_jax.errors import ModelDirError
from pdpo_jax.model.config import ModelConfig

PACKAGE_DIR = "architectures"


def _facts_file(hub_id: str):
    return resources.files("pdpo_jax").joinpath("resources", PACKAGE_DIR, hub_id.replace("/", "--") + ".json")


def known_architectures() -> list[str]:
    """The hub ids whose config.json ships with the package."""
    folder = resources.files("pdpo_jax").joinpath("resources", PACKAGE_DIR)
    return sorted(entry.name[: -len(".json")].replace("--", "/", 1) for entry in folder.iterdir()
                  if entry.name.endswith(".json"))


def published_config(hub_id: str) -> dict[str, Any]:
    """The shipped config.json dict of `hub_id` (with its `_provenance`)."""
    facts = _facts_file(hub_id)
    if not facts.is_file():
        raise ModelDirError(f"{hub_id}: not a local model directory and no published config.json ships for it "
                            f"(known: {', '.join(known_architectures())})")
    return json.loads(facts.read_text(encoding="utf-8"))


def architecture_of(path: str | os.PathLike, **overrides: Any) -> tuple[ModelConfig, str]:
    """`(ModelConfig, where it came from)` for a model path: a local directory's config.json,
    else the shipped facts of the hub id `path` names. `overrides` set dtype/remat."""
    local = Path(path) / "config.json"
    if local.is_file():
        return ModelConfig.from_json_file(local, **overrides), str(local)
    hub_id = os.fspath(path)
    source = f"published config.json of {hub_id} (shipped with pdpo_jax)"
    return ModelConfig.from_hf(published_config(hub_id), source=source, **overrides), source
