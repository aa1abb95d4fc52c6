"""A model family registered from outside the package: Qwen3, declared in this file alone.

Qwen3 is Llama with an RMSNorm over each query and key head before the rotary embedding
(`q_norm`, `k_norm`, weight [head_dim]). Everything the project needs of it is the one
`ModelFamily` below; the checks load a directory that transformers wrote and compare logits,
shardings, an export and a classifier config against transformers' own classes.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from model_fixtures import TINY_VOCAB, load_torch_model, padded_batch, torch_logits
from pdpo_jax import parallel
from pdpo_jax.model import Decoder, ModelConfig, load_hf, save_hf
from pdpo_jax.model.classifier import classifier_hf_config
from pdpo_jax.model.config import HfConfigReader
from pdpo_jax.model.decoder import RMSNorm, compute_dtype
from pdpo_jax.model.families import llama
from pdpo_jax.model.family import (HfArchitectures, KeyMapping, ModelFamily, family_for, family_of_model_type,
                                   register_family)

PARITY_TOL = 1e-4  # fp32, different op order than torch: as tests/test_model_parity.py


def read_qwen3(r: HfConfigReader, model_type: str) -> dict[str, Any]:
    r.refuse("use_sliding_window", False, "sliding-window layers are not implemented for qwen3")
    llama.refuse_mixed_layer_types(r, None)
    bias = bool(r.optional("attention_bias", False))
    return llama.read_rotary_decoder(r) | dict(attention_bias=bias, attention_out_bias=bias, mlp_bias=False)


def write_qwen3(c: ModelConfig) -> dict[str, Any]:
    return llama.write_rotary_decoder(c) | {
        "attention_bias": c.attention_bias, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": c.num_layers, "layer_types": ["full_attention"] * c.num_layers,
    }


class Qwen3Attention(llama.LlamaAttention):
    def normalize_heads(self, x, name):
        return RMSNorm(self.config.norm_eps, compute_dtype(self.config), name=name)(x)


class Qwen3Block(llama.LlamaBlock):
    attention_cls = Qwen3Attention


QWEN3 = register_family(ModelFamily(
    name="qwen3",
    architectures={"qwen3": HfArchitectures("Qwen3ForCausalLM", "Qwen3ForSequenceClassification")},
    read_hf=read_qwen3,
    write_hf=write_qwen3,
    block=Qwen3Block,
    final_norm=llama.rms_norm,
    names=llama.MODULE_NAMES,
    key_map=(*llama.KEY_MAP, *(KeyMapping(f"model.layers.{{i}}.self_attn.{n}.weight",
                                          f"model/layers/{{i}}/self_attn/{n}/weight") for n in ("q_norm", "k_norm"))),
))

TINY_QWEN3 = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, vocab_size=TINY_VOCAB, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """A random tiny Qwen3ForCausalLM saved by transformers, with norms away from 1 so a dropped
    or swapped q/k norm shows in the logits."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY_QWEN3))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    out = tmp_path_factory.mktemp("qwen3") / "tiny-qwen3"
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_a_family_registered_in_a_test_matches_transformers(qwen3_dir, left):
    config, params = load_hf(qwen3_dir)
    assert family_for(config) is QWEN3 and family_of_model_type("qwen3") is QWEN3
    assert params["model"]["layers"]["0"]["self_attn"]["q_norm"]["weight"].shape == (24,)
    batch = padded_batch([12, 7, 3], 12, left=left, seed=1)
    expected = torch_logits(load_torch_model(qwen3_dir), batch["input_ids"], batch["attention_mask"], batch["positions"])
    logits, _ = Decoder(config).apply({"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"])
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], expected[valid], atol=PARITY_TOL, rtol=0)
    # the q/k norms are in the computation: without them the logits move far beyond the tolerance
    plain, _ = Decoder(config.replace(family="llama", model_type="llama")).apply(
        {"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"])
    assert np.abs(np.asarray(plain)[valid] - expected[valid]).max() > 100 * PARITY_TOL


def test_the_registered_family_exports_shards_and_classifies(qwen3_dir, tmp_path):
    config, params = load_hf(qwen3_dir)
    # its parameters are split by the one rules table, the q/k norms replicated
    specs = traverse_util.flatten_dict(parallel.param_partition_specs(params), sep="/")
    assert specs["model/layers/1/self_attn/q_proj/kernel"] == P("fsdp", "tensor")
    assert specs["model/layers/1/self_attn/k_norm/weight"] == P()
    # an export is read back by transformers with the same weights
    out = save_hf(tmp_path / "export", config, params)
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["Qwen3ForCausalLM"] and written["head_dim"] == 24
    reloaded = load_torch_model(out).state_dict()
    original = load_torch_model(qwen3_dir).state_dict()
    assert set(reloaded) == set(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(reloaded[name].numpy(), tensor.numpy(), err_msg=name)
    assert classifier_hf_config(config, ("a", "b"), 0)["architectures"] == ["Qwen3ForSequenceClassification"]


def test_a_family_cannot_take_a_registered_name_or_model_type():
    with pytest.raises(ValueError, match="already registered"):
        register_family(ModelFamily(**{**QWEN3.__dict__, "key_map": ()}))
    with pytest.raises(ValueError, match="model type 'llama' already belongs to family 'llama'"):
        register_family(ModelFamily(**{**QWEN3.__dict__, "name": "other",
                                       "architectures": {"llama": QWEN3.architectures["qwen3"]}}))
    with pytest.raises(ValueError, match="declared with axes"):
        parallel.declare_param_axes("model/layers/{i}/self_attn/q_proj/kernel", ("heads", "embed"))
    with pytest.raises(ValueError, match="not one of"):
        parallel.declare_param_axes("model/layers/{i}/self_attn/q_norm/scale", ("head_dim",))


def test_an_unregistered_model_type_is_refused_by_name():
    with pytest.raises(ValueError, match=r"config.json: key 'model_type' = 'gemma' is not supported .*'qwen3'"):
        ModelConfig.from_hf({"model_type": "gemma"})
    with pytest.raises(ValueError, match="ModelConfig.family must be one of"):
        ModelConfig(family="gemma", model_type="gemma", vocab_size=8, hidden_size=8, num_layers=1, num_heads=1,
                    num_kv_heads=1, head_dim=8, intermediate_size=8, max_position_embeddings=8, norm_eps=1e-6)

