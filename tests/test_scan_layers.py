"""`model.scan_layers`: the decoder with one scanned block computes what the unrolled one does, and
its stacked parameters load, save, export, shard and digest as the per-layer ones."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from model_fixtures import load_torch_model, make_tiny_hf_model, padded_batch, torch_logits
from pdpo_jax import parallel
from pdpo_jax.generation.decode import cache_shardings, generate
from pdpo_jax.generation.sampling import TopP
from pdpo_jax.model import Decoder, load_model
from pdpo_jax.model.decoder import init_cache, param_shapes
from pdpo_jax.model.digest import model_digest
from pdpo_jax.model.export import export_hf
from pdpo_jax.model.layer_stack import is_stacked, per_layer_leaves, stack_layers, unstack_layers
from pdpo_jax.model.model_dir import write_params
from pdpo_jax.train import steps
from train_fixtures import micro_batches, sft_batch

PARITY_TOL = 1e-4  # against transformers, as tests/test_model_parity.py
SAME_MATH_TOL = 1e-5  # scanned vs unrolled: the same ops, fused differently
FAMILIES = {"gpt2": ("gpt2", {}), "llama": ("llama", {"num_hidden_layers": 3}), "qwen2": ("qwen2", {})}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    return {name: make_tiny_hf_model(root, family, name=name, initializer_range=0.3, **kw)
            for name, (family, kw) in FAMILIES.items()}


def forward(model, batch, **kwargs):
    return Decoder(model.config).apply({"params": model.params}, batch["input_ids"], batch["positions"],
                                       batch["segment_ids"], **kwargs)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_scanned_logits_match_transformers(tiny_dirs, name):
    scanned = load_model(tiny_dirs[name], scan_layers=True)
    assert is_stacked(scanned.params) and scanned.config.scan_layers
    kernel = scanned.params[("transformer" if name == "gpt2" else "model")][("h" if name == "gpt2" else "layers")]
    leading = {leaf.shape[0] for leaf in jax.tree.leaves(kernel["stacked"])}
    assert leading == {scanned.config.num_layers}
    batch = padded_batch([12, 7, 3], 12, left=True, seed=1)
    expected = torch_logits(load_torch_model(tiny_dirs[name]), batch["input_ids"], batch["attention_mask"],
                            batch["positions"])
    logits, _ = forward(scanned, batch)
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], expected[valid], atol=PARITY_TOL, rtol=0)


def test_stack_and_unstack_are_inverse(tiny_dirs):
    model = load_model(tiny_dirs["llama"])
    stacked = stack_layers(model.params, model.config)
    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(model.params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    leaves = per_layer_leaves(stacked)
    flat = traverse_util.flatten_dict(model.params, sep="/")
    assert sorted(leaves) == sorted(flat)
    for path, leaf in leaves.items():
        assert leaf.shape == flat[path].shape
        np.testing.assert_array_equal(np.asarray(leaf.value()), np.asarray(flat[path]))
    assert set(traverse_util.flatten_dict(stacked, sep="/")) == set(
        traverse_util.flatten_dict(param_shapes(model.config.replace(scan_layers=True)), sep="/"))


def sft_loss(config, params, batch):
    logits, _ = Decoder(config).apply({"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"])
    logps = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    token = jnp.take_along_axis(logps, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(token * batch["segment_ids"][:, 1:]) / jnp.sum(batch["segment_ids"][:, 1:])


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_scanned_gradients_equal_unrolled(tiny_dirs, remat):
    model = load_model(tiny_dirs["llama"], remat=remat)
    scanned = load_model(tiny_dirs["llama"], remat=remat, scan_layers=True)
    batch = padded_batch([10, 6], 10, seed=2)
    loss, grads = jax.value_and_grad(partial(sft_loss, model.config))(model.params, batch)
    scan_loss, scan_grads = jax.value_and_grad(partial(sft_loss, scanned.config))(scanned.params, batch)
    np.testing.assert_allclose(float(scan_loss), float(loss), rtol=1e-6)
    expected = traverse_util.flatten_dict(grads, sep="/")
    for path, leaf in per_layer_leaves(scan_grads).items():
        np.testing.assert_allclose(np.asarray(leaf.value()), np.asarray(expected[path]), atol=SAME_MATH_TOL, rtol=0,
                                   err_msg=path)


def test_scanned_train_step_on_a_mesh_equals_unrolled(tiny_dirs):
    """One sharded AdamW SFT step: the stacked state is split like the per-layer one, layer axis whole."""
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    optimizer = optax.adamw(1e-3)
    objective_states = {}
    for scan in (False, True):
        model = load_model(tiny_dirs["llama"], mesh=mesh, scan_layers=scan)
        objective = partial(steps.sft_objective, config=model.config)
        shardings = steps.state_shardings(param_shapes(model.config), optimizer, mesh)
        state = jax.device_put(steps.create_train_state(model.params, optimizer), shardings)
        batch = micro_batches(sft_batch(seed=3, rows=8), 2)
        objective_states[scan] = steps.jit_train_step(objective, optimizer, mesh, shardings)(
            state, steps.put_micro_batches(batch, mesh))
    (state, metrics), (scan_state, scan_metrics) = objective_states[False], objective_states[True]
    q_proj = scan_state.params["model"]["layers"]["stacked"]["self_attn"]["q_proj"]["kernel"]
    assert q_proj.sharding.spec == parallel.P(None, "fsdp", "tensor")
    for name, (total, count) in metrics.items():
        np.testing.assert_allclose(scan_metrics[name][0], total, rtol=1e-5, err_msg=name)
    expected = traverse_util.flatten_dict(state.params, sep="/")
    for path, leaf in per_layer_leaves(scan_state.params).items():
        np.testing.assert_allclose(np.asarray(leaf.value()), np.asarray(expected[path]), atol=1e-5, rtol=0,
                                   err_msg=path)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_scanned_sampling_equals_unrolled(tiny_dirs, name):
    """Top-p sampling through the stacked KV cache draws the same tokens, on one device and on a mesh."""
    batch = padded_batch([9, 4, 7, 5], 9, left=True, seed=4)
    tokens = {}
    for scan in (False, True):
        model = load_model(tiny_dirs[name], scan_layers=scan)
        model = dataclasses.replace(model, config=model.config.replace(eos_token_id=10_000, pad_token_id=0))
        tokens[scan] = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=12,
                                sampler=TopP(0.9), seed=5)
    np.testing.assert_array_equal(tokens[True], tokens[False])
    assert len(np.unique(tokens[False])) > 6  # a real sample

    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    on_mesh = load_model(tiny_dirs[name], mesh=mesh, scan_layers=True)
    on_mesh = dataclasses.replace(on_mesh, config=on_mesh.config.replace(eos_token_id=10_000, pad_token_id=0))
    sharded = generate(on_mesh, batch["input_ids"], batch["attention_mask"], max_new_tokens=12, sampler=TopP(0.9),
                       seed=5, mesh=mesh)
    np.testing.assert_array_equal(sharded, tokens[False])


def test_stacked_cache_is_split_over_batch_and_kv_heads(tiny_dirs):
    config = load_model(tiny_dirs["llama"]).config.replace(scan_layers=True)
    cache = jax.eval_shape(lambda: init_cache(config, 4, 32))
    assert cache["k"].shape == (config.num_layers, 4, config.num_kv_heads, 32, config.head_dim)
    shardings = cache_shardings(config, parallel.make_mesh(data=2, fsdp=2, tensor=2), batch=4, length=32)
    assert shardings["k"].spec == parallel.P(None, ("data", "fsdp"), "tensor", None, None)


def test_scanned_model_saves_exports_and_digests_per_layer(tiny_dirs, tmp_path):
    """A scanned run's best/ holds the per-layer layout: it loads unscanned, exports to the same
    safetensors and has the same digest as the model it was loaded from."""
    from safetensors.numpy import load_file

    source = load_model(tiny_dirs["gpt2"])
    scanned = load_model(tiny_dirs["gpt2"], mesh=parallel.make_mesh(data=2, fsdp=2, tensor=2), scan_layers=True)
    assert model_digest(scanned) == model_digest(source)
    model_dir = tmp_path / "best"
    model_dir.mkdir()
    write_params(model_dir, scanned.params)
    (model_dir / "config.json").write_text((tiny_dirs["gpt2"] / "config.json").read_text())
    reread = load_model(model_dir)
    assert not is_stacked(reread.params)
    assert model_digest(reread) == model_digest(source)
    export_hf(model_dir, tmp_path / "hf")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    original = load_file(tiny_dirs["gpt2"] / "model.safetensors")
    assert set(exported) <= set(original)
    for name, tensor in exported.items():
        np.testing.assert_array_equal(tensor, original[name], err_msg=name)
