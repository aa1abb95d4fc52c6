"""Mesh construction, partition rules, and a sharded forward equal to the single-device one."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from model_fixtures import make_tiny_hf_model, padded_batch
from pdpo_jax import parallel
from pdpo_jax.model import Decoder, load_hf


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    return {family: make_tiny_hf_model(root, family) for family in ("llama", "gpt2")}


def test_make_mesh_fills_the_free_axis():
    mesh = parallel.make_mesh(fsdp=2, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="devices"):
        parallel.make_mesh(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="at most one axis"):
        parallel.make_mesh(data=-1, fsdp=-1)


def test_rules_and_indivisible_fallback(tiny_models):
    _, params = load_hf(tiny_models["llama"])
    specs = parallel.param_partition_specs(params)
    layer = specs["model"]["layers"]["0"]
    assert layer["self_attn"]["q_proj"]["kernel"] == P("fsdp", "tensor")
    assert layer["self_attn"]["o_proj"]["kernel"] == P("tensor", "fsdp")
    assert layer["mlp"]["down_proj"]["kernel"] == P("tensor", "fsdp")
    assert layer["input_layernorm"]["weight"] == P()
    assert specs["model"]["embed_tokens"]["embedding"] == P("tensor", "fsdp")
    # a dimension the mesh axis does not divide is replicated instead
    shapes = {"model/layers/0/mlp/up_proj/kernel": (64, 96)}
    mesh = parallel.make_mesh(data=1, fsdp=2, tensor=4)
    assert parallel.partition_specs_for_shapes(shapes, mesh=mesh)["model/layers/0/mlp/up_proj/kernel"] == P("fsdp", "tensor")
    odd = {"model/layers/0/mlp/up_proj/kernel": (63, 96), "model/layers/0/mlp/down_proj/kernel": (94, 64)}
    fitted = parallel.partition_specs_for_shapes(odd, mesh=mesh)
    assert fitted["model/layers/0/mlp/up_proj/kernel"] == P(None, "tensor")
    assert fitted["model/layers/0/mlp/down_proj/kernel"] == P(None, "fsdp")


@pytest.mark.parametrize("family, axes", [("llama", (1, 2, 4)), ("gpt2", (2, 2, 2))])
def test_sharded_forward_equals_single_device(tiny_models, family, axes):
    config, params = load_hf(tiny_models[family])
    batch = padded_batch([10, 7, 10, 3], 10, seed=8)
    inputs = (batch["input_ids"], batch["positions"], batch["segment_ids"])
    single, _ = jax.jit(Decoder(config).apply)({"params": params}, *inputs)

    mesh = parallel.make_mesh(*axes)
    sharded_params = parallel.shard_params(params, mesh)
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded_params))
    rows = parallel.batch_sharding(mesh)
    step = jax.jit(Decoder(config).apply, in_shardings=({"params": parallel.param_shardings(params, mesh)}, rows, rows, rows),
                   out_shardings=(rows, None))
    sharded, _ = step({"params": sharded_params}, *(jax.device_put(x, rows) for x in inputs))
    assert isinstance(sharded.sharding, NamedSharding) and len(sharded.addressable_shards) == 8
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=0)


def test_global_batch_from_local_single_process():
    mesh = parallel.make_mesh(data=4, fsdp=2)
    local = {"input_ids": np.arange(16 * 3, dtype=np.int32).reshape(16, 3)}
    batch = parallel.place_batch(local, mesh, rows="local")
    assert batch["input_ids"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), local["input_ids"])


def test_initialize_distributed_is_a_no_op_on_one_process(monkeypatch):
    for name in ("PDPO_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize_distributed() is False


# Every parameter's PartitionSpec on the tiny models, layer 0 standing for every layer. The
# families declare logical axes and one rules table maps them to mesh axes; these are the specs it
# must give.
LLAMA_SPECS = {
    "model/embed_tokens/embedding": P("tensor", "fsdp"),
    "model/layers/0/self_attn/q_proj/kernel": P("fsdp", "tensor"),
    "model/layers/0/self_attn/q_proj/bias": P(),
    "model/layers/0/self_attn/k_proj/kernel": P("fsdp", "tensor"),
    "model/layers/0/self_attn/k_proj/bias": P(),
    "model/layers/0/self_attn/v_proj/kernel": P("fsdp", "tensor"),
    "model/layers/0/self_attn/v_proj/bias": P(),
    "model/layers/0/self_attn/o_proj/kernel": P("tensor", "fsdp"),
    "model/layers/0/mlp/gate_proj/kernel": P("fsdp", "tensor"),
    "model/layers/0/mlp/up_proj/kernel": P("fsdp", "tensor"),
    "model/layers/0/mlp/down_proj/kernel": P("tensor", "fsdp"),
    "model/layers/0/input_layernorm/weight": P(),
    "model/layers/0/post_attention_layernorm/weight": P(),
    "model/norm/weight": P(),
    "lm_head/kernel": P("fsdp", "tensor"),
}
GPT2_SPECS = {
    "transformer/wte/embedding": P("tensor", "fsdp"),
    "transformer/wpe/embedding": P(None, "fsdp"),
    **{f"transformer/h/0/{ln}/{leaf}": P() for ln in ("ln_1", "ln_2") for leaf in ("scale", "bias")},
    "transformer/h/0/attn/c_attn/kernel": P("tensor", "fsdp"),
    "transformer/h/0/attn/c_attn/bias": P(),
    "transformer/h/0/attn/c_proj/kernel": P("fsdp", "tensor"),
    "transformer/h/0/attn/c_proj/bias": P(),
    "transformer/h/0/mlp/c_fc/kernel": P("tensor", "fsdp"),
    "transformer/h/0/mlp/c_fc/bias": P(),
    "transformer/h/0/mlp/c_proj/kernel": P("fsdp", "tensor"),
    "transformer/h/0/mlp/c_proj/bias": P(),
    "transformer/ln_f/scale": P(),
    "transformer/ln_f/bias": P(),
    "lm_head/kernel": P("fsdp", "tensor"),
}


def _tiny_config(model_type: str, **overrides):
    from model_fixtures import hf_config
    from pdpo_jax.model import ModelConfig

    return ModelConfig.from_hf(hf_config(model_type, **overrides).to_dict(), **{"scan_layers": False})


def _layer_zero(path: str) -> str:
    parts = path.split("/")
    return "/".join("0" if part.isdigit() or part == parallel.STACKED_LAYERS else part for part in parts)


@pytest.mark.parametrize("model_type, overrides, expected", [
    ("llama", {}, LLAMA_SPECS), ("qwen2", {}, LLAMA_SPECS),
    ("gpt2", {}, GPT2_SPECS), ("gpt2", {"tie_word_embeddings": False}, GPT2_SPECS),
])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_parameter_gets_the_specs_of_the_rules_table(model_type, overrides, expected, scan_layers):
    from flax import traverse_util
    from pdpo_jax.model.decoder import param_shapes

    config = _tiny_config(model_type, **overrides).replace(scan_layers=scan_layers)
    flat = traverse_util.flatten_dict(param_shapes(config), sep="/")
    mesh = parallel.make_mesh(data=1, fsdp=2, tensor=4)
    for with_mesh in (None, mesh):
        specs = parallel.partition_specs_for_shapes({p: leaf.shape for p, leaf in flat.items()}, mesh=with_mesh)
        for path, spec in specs.items():
            want = expected[_layer_zero(path)]
            if f"/{parallel.STACKED_LAYERS}/" in path:  # the leading layer axis is never split
                want = P(None, *want)
            assert spec == want, path
    # a tree that holds the model under a prefix (PPO's policy beside its value head) is split the same
    nested = {"policy": param_shapes(config), "value_head": {"kernel": jax.ShapeDtypeStruct((64, 1), np.float32)}}
    specs = traverse_util.flatten_dict(parallel.param_partition_specs(nested), sep="/")
    assert specs["value_head/kernel"] == P()
    for path, spec in specs.items():
        if path.startswith("policy/"):
            want = expected[_layer_zero(path[len("policy/"):])]
            assert spec == (P(None, *want) if f"/{parallel.STACKED_LAYERS}/" in path else want), path


def test_a_classifier_head_is_replicated():
    shapes = {"score/kernel": (64, 3), "model/embed_tokens/embedding": (128, 64)}
    specs = parallel.partition_specs_for_shapes(shapes)
    assert specs == {"score/kernel": P(), "model/embed_tokens/embedding": P("tensor", "fsdp")}
