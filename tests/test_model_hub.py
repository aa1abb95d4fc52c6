"""A model named by its Hugging Face Hub id loads from the Hub cache exactly like its folder; an id
the Hub cannot provide (offline here) is named in a one-line error with what to do."""

from __future__ import annotations

import shutil

import huggingface_hub.constants
import numpy as np
import pytest
from flax import traverse_util
from model_fixtures import make_tiny_hf_model

from pdpo_jax.errors import ModelDirError
from pdpo_jax.model import load_model
from pdpo_jax.model.hub import looks_like_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A Hub cache holding `example-org/tiny-llama` as `hf download` leaves it, with the Hub unreachable."""
    cache = tmp_path / "hub"
    model_dir = make_tiny_hf_model(tmp_path, "llama", seed=4)
    repo = cache / "models--example-org--tiny-llama"
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return model_dir


def test_a_hub_id_loads_the_cached_snapshot(offline_cache):
    from_hub, from_dir = load_model("example-org/tiny-llama"), load_model(offline_cache)
    assert from_hub.path.name == COMMIT and from_hub.config == from_dir.config
    hub_params = traverse_util.flatten_dict(from_hub.params, sep="/")
    for path, value in traverse_util.flatten_dict(from_dir.params, sep="/").items():
        np.testing.assert_array_equal(np.asarray(hub_params[path]), np.asarray(value), err_msg=path)


def test_an_id_the_hub_cannot_provide_is_named(offline_cache):
    with pytest.raises(ModelDirError, match="example-org/missing: no such directory here.*hf download example-org/missing"):
        load_model("example-org/missing")


def test_paths_are_not_taken_for_hub_ids(tmp_path):
    assert looks_like_hub_id("meta-llama/Llama-2-13b-hf")
    assert not looks_like_hub_id("/abs/path") and not looks_like_hub_id("runs/demo/sft/best")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    assert not looks_like_hub_id(str(tmp_path / "org" / "model"))
