"""Optimizer and schedules: hand-checked values, and parity with Hugging Face Trainer + torch AdamW."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pdpo_jax.config import DPO_DEFAULTS, SFT_DEFAULTS, OptimizerConfig
from pdpo_jax.train.optim import (
    make_optimizer,
    make_schedule,
    warmup_steps,
    weight_decay_mask,
)


def test_paper_defaults():
    for cfg in (SFT_DEFAULTS, DPO_DEFAULTS):
        assert (cfg.b1, cfg.b2, cfg.eps) == (0.9, 0.999, 1e-8)
        assert (cfg.weight_decay, cfg.max_grad_norm, cfg.warmup_ratio) == (0.1, 1.0, 0.05)
    assert (SFT_DEFAULTS.learning_rate, SFT_DEFAULTS.schedule) == (1e-5, "cosine")
    assert (DPO_DEFAULTS.learning_rate, DPO_DEFAULTS.schedule) == (1e-6, "linear")


def test_warmup_steps_round_up():
    assert warmup_steps(SFT_DEFAULTS, 1000) == 50
    assert warmup_steps(SFT_DEFAULTS, 30) == 2  # ceil(1.5)
    assert warmup_steps(dataclasses.replace(SFT_DEFAULTS, warmup_ratio=0.0), 30) == 0


# 100 steps with 20% warmup: warmup ends at step 20, decay runs over 80 steps to step 100.
HAND_CHECKED = {
    # step: (cosine, linear, constant) as fractions of the peak rate
    0: (0.0, 0.0, 0.0),
    10: (0.5, 0.5, 0.5),
    20: (1.0, 1.0, 1.0),
    40: (0.5 * (1 + math.cos(math.pi / 4)), 0.75, 1.0),  # a quarter of the decay: 0.853553...
    60: (0.5, 0.5, 1.0),
    80: (0.5 * (1 + math.cos(3 * math.pi / 4)), 0.25, 1.0),  # 0.146446...
    100: (0.0, 0.0, 1.0),
    120: (0.0, 0.0, 1.0),
}


@pytest.mark.parametrize("column, schedule", list(enumerate(["cosine", "linear", "constant"])))
def test_schedule_values_by_hand(column, schedule):
    cfg = OptimizerConfig(learning_rate=2e-5, schedule=schedule, warmup_ratio=0.2)
    schedule_fn = make_schedule(cfg, total_steps=100)
    for step, fractions in HAND_CHECKED.items():
        # float32 arithmetic: exact to a millionth of the peak rate.
        assert float(schedule_fn(step)) == pytest.approx(2e-5 * fractions[column], abs=2e-11), step


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("total_steps", [1, 7, 37, 250])
def test_schedules_match_hugging_face(schedule, total_steps):
    optimization = pytest.importorskip("transformers.optimization")
    cfg = OptimizerConfig(learning_rate=3e-4, schedule=schedule)
    warmup = math.ceil(0.05 * total_steps)  # TrainingArguments.get_warmup_steps for a ratio
    hf_lambda = {
        "cosine": lambda s: optimization._get_cosine_schedule_with_warmup_lr_lambda(
            s, num_warmup_steps=warmup, num_training_steps=total_steps, num_cycles=0.5
        ),
        "linear": lambda s: optimization._get_linear_schedule_with_warmup_lr_lambda(
            s, num_warmup_steps=warmup, num_training_steps=total_steps
        ),
        "constant": lambda s: optimization._get_constant_schedule_with_warmup_lr_lambda(
            s, num_warmup_steps=warmup
        ),
    }[schedule]
    schedule_fn = make_schedule(cfg, total_steps)
    # The updates of a run use steps 0 .. total_steps - 1.
    steps = np.arange(total_steps)
    got = np.asarray(jax.vmap(schedule_fn)(jnp.asarray(steps)))
    want = np.asarray([3e-4 * hf_lambda(int(s)) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * 3e-4)


def decayed_paths(params) -> set[str]:
    mask = weight_decay_mask(params)
    return {
        ".".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)
        for path, decays in jax.tree_util.tree_flatten_with_path(mask)[0]
        if decays
    }


def test_weight_decay_mask_on_flax_named_parameters():
    gpt2 = {
        "transformer": {
            "wte": {"embedding": 0},
            "wpe": {"embedding": 0},
            "h": {
                "0": {
                    "ln_1": {"scale": 0, "bias": 0},
                    "attn": {"c_attn": {"kernel": 0, "bias": 0}, "c_proj": {"kernel": 0, "bias": 0}},
                    "ln_2": {"scale": 0, "bias": 0},
                    "mlp": {"c_fc": {"kernel": 0, "bias": 0}, "c_proj": {"kernel": 0, "bias": 0}},
                }
            },
            "ln_f": {"scale": 0, "bias": 0},
        }
    }
    assert decayed_paths(gpt2) == {
        "transformer.wte.embedding",
        "transformer.wpe.embedding",
        "transformer.h.0.attn.c_attn.kernel",
        "transformer.h.0.attn.c_proj.kernel",
        "transformer.h.0.mlp.c_fc.kernel",
        "transformer.h.0.mlp.c_proj.kernel",
    }
    llama = {
        "model": {
            "embed_tokens": {"embedding": 0},
            "layers": {
                "0": {
                    "input_layernorm": {"weight": 0},
                    "self_attn": {"q_proj": {"kernel": 0, "bias": 0}, "o_proj": {"kernel": 0}},
                    "post_attention_layernorm": {"weight": 0},
                    "mlp": {"gate_proj": {"kernel": 0}},
                }
            },
            "norm": {"weight": 0},
        },
        "lm_head": {"kernel": 0},
    }
    assert decayed_paths(llama) == {
        "model.embed_tokens.embedding",
        "model.layers.0.self_attn.q_proj.kernel",
        "model.layers.0.self_attn.o_proj.kernel",
        "model.layers.0.mlp.gate_proj.kernel",
        "lm_head.kernel",
    }


def nested(names: list[str]) -> dict:
    tree: dict = {}
    for name in names:
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = 0
    return tree


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_weight_decay_mask_matches_hugging_face_trainer(family):
    transformers = pytest.importorskip("transformers")
    tiny = {"vocab_size": 16}
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=8, **tiny)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
        sizes = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
        model = transformers.AutoModelForCausalLM.from_config(config_class(num_key_value_heads=1, **sizes, **tiny))
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    hf_decayed = set(transformers.Trainer.get_decay_parameter_names(None, model))
    assert decayed_paths(nested(names)) == hf_decayed
    assert set(names) - hf_decayed  # the model does have biases or norms left out


def test_adamw_with_clipping_matches_torch_and_hugging_face_schedule():
    torch = pytest.importorskip("torch")
    optimization = pytest.importorskip("transformers.optimization")
    total_steps = 6
    cfg = OptimizerConfig(learning_rate=1e-2, schedule="linear", warmup_ratio=0.3, weight_decay=0.1)
    rng = np.random.default_rng(0)
    params = {
        "dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32), "bias": rng.normal(size=4).astype(np.float32)},
        "norm": {"weight": rng.normal(size=4).astype(np.float32)},
    }
    # Gradients large enough that clipping to norm 1 is active on every step.
    grads_per_step = [
        jax.tree.map(lambda p: (rng.normal(size=p.shape) * 3).astype(np.float32), params) for _ in range(total_steps)
    ]

    optimizer, _ = make_optimizer(cfg, total_steps)
    jax_params = jax.tree.map(jnp.asarray, params)
    state = optimizer.init(jax_params)
    for grads in grads_per_step:
        updates, state = optimizer.update(jax.tree.map(jnp.asarray, grads), state, jax_params)
        jax_params = optax.apply_updates(jax_params, updates)

    torch_params = {name: torch.tensor(value, requires_grad=True) for name, value in _flat(params).items()}
    torch_optimizer = torch.optim.AdamW(
        [
            {"params": [torch_params["dense.kernel"]], "weight_decay": cfg.weight_decay},
            {"params": [torch_params["dense.bias"], torch_params["norm.weight"]], "weight_decay": 0.0},
        ],
        lr=cfg.learning_rate,
        betas=(cfg.b1, cfg.b2),
        eps=cfg.eps,
    )
    scheduler = optimization.get_linear_schedule_with_warmup(torch_optimizer, math.ceil(0.3 * total_steps), total_steps)
    for grads in grads_per_step:
        for name, grad in _flat(grads).items():
            torch_params[name].grad = torch.tensor(grad)
        torch.nn.utils.clip_grad_norm_(list(torch_params.values()), cfg.max_grad_norm)
        torch_optimizer.step()
        scheduler.step()

    for name, value in _flat(jax_params).items():
        np.testing.assert_allclose(np.asarray(value), torch_params[name].detach().numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(jax_params["dense"]["kernel"]), params["dense"]["kernel"])


def _flat(tree) -> dict:
    return {f"{outer}.{inner}": leaf for outer, sub in tree.items() for inner, leaf in sub.items()}


def test_weight_decay_leaves_biases_and_norms_alone():
    # With zero gradients AdamW's only move is the decay, which must touch the kernel alone.
    optimizer, _ = make_optimizer(OptimizerConfig(learning_rate=0.5, schedule="constant", warmup_ratio=0.0), 10)
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "final_norm": {"weight": jnp.ones(2)}}
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.5 * 0.1)
    np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
    np.testing.assert_array_equal(updates["final_norm"]["weight"], 0.0)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("schedule", "step", "optimizer.schedule"),
        ("learning_rate", 0.0, "optimizer.learning_rate"),
        ("warmup_ratio", 1.0, "optimizer.warmup_ratio"),
        ("weight_decay", -0.1, "optimizer.weight_decay"),
        ("max_grad_norm", 0.0, "optimizer.max_grad_norm"),
    ],
)
def test_bad_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**{field: value})


def test_total_steps_must_be_positive():
    with pytest.raises(ValueError, match="total_steps"):
        make_optimizer(SFT_DEFAULTS, 0)
