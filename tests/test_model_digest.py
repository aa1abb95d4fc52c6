"""model_digest: equal for equal models however they were saved, different when a weight or the
architecture differs."""

from __future__ import annotations

import time

import jax
import numpy as np
from model_fixtures import make_tiny_hf_model

from pdpo_jax.model import load_model, save_hf
from pdpo_jax.model.digest import model_digest
from pdpo_jax.train.checkpoints import save_best_params


def test_the_same_parameters_saved_twice_have_one_digest(tmp_path):
    source = make_tiny_hf_model(tmp_path, "llama")
    model = load_model(source)
    save_best_params(tmp_path / "first", model.params, source, {"step": 1})
    time.sleep(1.1)  # orbax metadata records times: the files differ, the model does not
    save_best_params(tmp_path / "second", model.params, source, {"step": 2})
    first, second = (load_model(tmp_path / name) for name in ("first", "second"))
    files = sorted(p.relative_to(tmp_path / "first") for p in (tmp_path / "first" / "params").rglob("*") if p.is_file())
    assert any((tmp_path / "first" / f).read_bytes() != (tmp_path / "second" / f).read_bytes() for f in files)
    assert model_digest(first) == model_digest(second) == model_digest(model)
    assert model_digest(model).startswith("sha256:")


def test_an_export_keeps_the_digest_and_a_changed_weight_or_architecture_does_not(tmp_path):
    source = make_tiny_hf_model(tmp_path, "gpt2")
    model = load_model(source)
    save_hf(tmp_path / "exported", model.config, model.params, max_shard_bytes=20_000)  # other shards, same model
    assert model_digest(load_model(tmp_path / "exported")) == model_digest(model)

    changed = jax.tree.map(np.array, model.params)
    leaf = changed["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"]
    leaf[0, 0] = np.nextafter(leaf[0, 0], np.float32(np.inf))  # one ulp of one weight
    assert model_digest(type(model)(model.config, changed, model.tokenizer, model.path)) != model_digest(model)

    other_eps = model.config.replace(norm_eps=model.config.norm_eps * 2)
    assert model_digest(type(model)(other_eps, model.params, model.tokenizer, model.path)) != model_digest(model)
    same_run_settings = model.config.replace(dtype="bfloat16", remat=True)  # how it runs, not what it is
    assert model_digest(type(model)(same_run_settings, model.params, model.tokenizer, model.path)) == model_digest(model)
