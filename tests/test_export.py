import numpy as np
import pytest
from model_fixtures import load_torch_model, make_tiny_hf_model, torch_logits

from pdpo_jax.cli import main as pdpo
from pdpo_jax.model import Decoder, load_model
from pdpo_jax.model.export import parse_size


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_cli_output_loads_in_transformers_with_our_logits(tmp_path, family):
    source = make_tiny_hf_model(tmp_path, family, tie_word_embeddings=(family == "gpt2"))
    out = tmp_path / "exported"
    assert pdpo(["export-hf", "--model", str(source), "--out", str(out), "--max-shard-size", "20KB"]) == 0
    assert (out / "model.safetensors.index.json").exists()  # sharded above the limit
    ours = load_model(source)
    ids = np.array([[5, 9, 17, 33, 2, 64]], np.int32)
    positions = np.arange(ids.shape[1], dtype=np.int32)[None]
    logits, _ = Decoder(ours.config).apply({"params": ours.params}, ids, positions, np.ones_like(ids))
    reference = torch_logits(load_torch_model(out), ids, np.ones_like(ids), positions)
    np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-4, rtol=0)


def test_size_parsing():
    assert parse_size("2GB") == 2 * 1024**3 and parse_size("512MB") == 512 * 1024**2 and parse_size("100") == 100
