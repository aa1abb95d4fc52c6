"""Hugging Face import/export: reload in transformers, bit-exact round trips, sharding, msgpack,
config layouts, and errors that name the file and key."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import serialization
from safetensors.numpy import load_file, save_file

from model_fixtures import load_torch_model, make_tiny_hf_model, padded_batch, torch_logits
from pdpo_jax import parallel
from pdpo_jax.model import Decoder, ModelConfig, load_hf, load_model, save_hf

MODELS = {"gpt2": ("gpt2", {}), "llama": ("llama", {}), "llama_tied": ("llama", {"tie_word_embeddings": True}),
          "qwen2": ("qwen2", {})}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_tiny_hf_model(root, family, name=name, **kw) for name, (family, kw) in MODELS.items()}


def read_all_tensors(model_dir):
    if (model_dir / "model.safetensors").exists():
        return load_file(model_dir / "model.safetensors")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    out = {}
    for file_name in sorted(set(index["weight_map"].values())):
        out |= load_file(model_dir / file_name)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bit_identical_and_reloads_in_transformers(tiny_models, tmp_path, name):
    source = tiny_models[name]
    config, params = load_hf(source)
    out = save_hf(tmp_path / "export", config, params)
    original, exported = read_all_tensors(source), read_all_tensors(out)
    assert sorted(exported) == sorted(original)
    for key, array in original.items():
        assert exported[key].dtype == array.dtype and np.array_equal(exported[key], array), key
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    batch = padded_batch([9, 4], 9, seed=7)
    reloaded = load_torch_model(out)
    assert reloaded.config.tie_word_embeddings == config.tie_word_embeddings
    expected = torch_logits(reloaded, batch["input_ids"], batch["attention_mask"], batch["positions"])
    ours, _ = Decoder(config).apply({"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"])
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], expected[valid], atol=1e-4, rtol=0)


def test_sharded_export_writes_index_and_reloads(tiny_models, tmp_path):
    config, params = load_hf(tiny_models["llama"])
    out = save_hf(tmp_path / "sharded", config, params, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    _, again = load_hf(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    load_torch_model(out)  # transformers follows the index too


def test_save_replaces_existing_directory_atomically(tiny_models, tmp_path):
    config, params = load_hf(tiny_models["gpt2"])
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    save_hf(target, config, params)
    assert not (target / "stale.txt").exists() and (target / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary leftovers


def test_flax_msgpack_loads(tiny_models, tmp_path):
    config, params = load_hf(tiny_models["gpt2"])
    model_dir = tmp_path / "flax"
    model_dir.mkdir()
    shutil.copy(tiny_models["gpt2"] / "config.json", model_dir / "config.json")
    (model_dir / "flax_model.msgpack").write_bytes(serialization.to_bytes(jax.tree.map(np.asarray, params)))
    _, loaded = load_hf(model_dir)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_pickle_refused_unless_allowed(tiny_models, tmp_path):
    import torch

    model_dir = tmp_path / "bin"
    model_dir.mkdir()
    shutil.copy(tiny_models["llama"] / "config.json", model_dir / "config.json")
    state = {k: torch.from_numpy(v) for k, v in read_all_tensors(tiny_models["llama"]).items()}
    torch.save(state, model_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        load_hf(model_dir)
    _, params = load_hf(model_dir, allow_pickle=True)
    _, reference = load_hf(tiny_models["llama"])
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_load_onto_mesh_places_each_array_on_its_sharding(tiny_models):
    mesh = parallel.make_mesh(data=1, fsdp=2, tensor=4)
    _, params = load_hf(tiny_models["llama"], shardings=mesh)
    q = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 16)


def test_load_model_with_tokenizer(tiny_models, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)} | {"[UNK]": 0}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    config, params = load_hf(tiny_models["llama_tied"])
    out = save_hf(tmp_path / "with_tok", config, params, tokenizer=tokenizer)
    loaded = load_model(out)
    assert loaded.config == config and loaded.path == out
    assert loaded.tokenizer("w5 w7")["input_ids"] == [5, 7]
    assert load_model(tiny_models["llama"]).tokenizer is None


# ----------------------------------------------------------------------------- config layouts


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2"])
def test_config_round_trip(tiny_models, family):
    from model_fixtures import hf_config

    config = ModelConfig.from_hf(hf_config(family).to_dict())
    assert ModelConfig.from_hf(config.to_hf()) == config
    hash(config)


def test_transformers4_and_5_rope_layouts_agree():
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16}
    v4 = base | {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    v5 = base | {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}
    a, b = ModelConfig.from_hf(v4), ModelConfig.from_hf(v5)
    assert a == b and a.rope_theta == 5e5 and a.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert ModelConfig.from_hf(base).rope_theta == 10000.0


# ----------------------------------------------------------------------------- bad input


def copy_model(source, target):
    shutil.copytree(source, target)
    return target


def test_missing_and_corrupt_config(tiny_models, tmp_path):
    broken = copy_model(tiny_models["llama"], tmp_path / "m")
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"m/config\.json"):
        load_hf(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"m/config\.json.*not valid JSON"):
        load_hf(broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 128}))
    with pytest.raises(ValueError, match=r"config\.json: missing required key 'hidden_size'"):
        load_hf(broken)


@pytest.mark.parametrize("change, key", [
    ({"model_type": "bert"}, "model_type"),
    ({"hidden_act": "mish"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_parameters"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 4.0, "rope_theta": 1e4}}, "rope_parameters"),
])
def test_unsupported_options_are_refused(tiny_models, tmp_path, change, key):
    broken = copy_model(tiny_models["llama"], tmp_path / "m")
    config = json.loads((broken / "config.json").read_text()) | change
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"config\.json.*{key}"):
        load_hf(broken)


def test_qwen2_mixed_sliding_layers_refused(tiny_models):
    config = json.loads((tiny_models["qwen2"] / "config.json").read_text())
    config |= {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    with pytest.raises(ValueError, match=r"my/config\.json.*max_window_layers"):
        ModelConfig.from_hf(config, source="my/config.json")
    assert ModelConfig.from_hf(config | {"max_window_layers": 0}).sliding_window == 4
    assert ModelConfig.from_hf(config | {"use_sliding_window": False}).sliding_window is None


def test_gpt2_per_layer_scaling_refused(tiny_models):
    config = json.loads((tiny_models["gpt2"] / "config.json").read_text()) | {"scale_attn_by_inverse_layer_idx": True}
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        ModelConfig.from_hf(config)


def rewrite_tensors(model_dir, edit):
    tensors = edit(load_file(model_dir / "model.safetensors"))
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_named(tiny_models, tmp_path):
    broken = copy_model(tiny_models["llama"], tmp_path / "m")
    rewrite_tensors(broken, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_hf(broken)


def test_wrong_shape_named(tiny_models, tmp_path):
    broken = copy_model(tiny_models["gpt2"], tmp_path / "m")
    rewrite_tensors(broken, lambda t: t | {"transformer.h.0.attn.c_proj.weight": np.zeros((64, 32), np.float32)})
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'transformer\.h\.0\.attn\.c_proj\.weight' has shape"):
        load_hf(broken)


def test_unexpected_tensor_named(tiny_models, tmp_path):
    broken = copy_model(tiny_models["llama"], tmp_path / "m")
    rewrite_tensors(broken, lambda t: t | {"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)})
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_norm\.weight'"):
        load_hf(broken)


def test_truncated_safetensors_named(tiny_models, tmp_path):
    broken = copy_model(tiny_models["llama"], tmp_path / "m")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"m/model\.safetensors"):
        load_hf(broken)


def test_no_weights_named(tiny_models, tmp_path):
    broken = copy_model(tiny_models["llama"], tmp_path / "m")
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"m: no weights found"):
        load_hf(broken)
