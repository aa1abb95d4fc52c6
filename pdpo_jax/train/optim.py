"""AdamW with global-norm clipping and a warmup + decay learning-rate schedule.

Defaults are the paper's (Appendix B): AdamW (β1 0.9, β2 0.999, ε 1e-8), weight decay 0.1,
gradient-norm clipping at 1.0, 5% linear warmup; SFT at 1e-5 with cosine decay, DPO at 1e-6 with
linear decay. Schedules follow Hugging Face's `get_*_schedule_with_warmup`: the rate rises linearly
from 0 over `ceil(warmup_ratio * total_steps)` steps and then decays to 0 at `total_steps`.

Gradient accumulation belongs to the train step, which calls `update` once per optimizer step.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import optax

from pdpo_jax.config import OptimizerConfig


# Hugging Face Trainer's name patterns (matched on the lower-cased dotted path), plus GPT-2's `ln_*`
# LayerNorm modules, which the Trainer excludes by their torch type rather than their name.
_NO_DECAY_PATTERNS = tuple(
    re.compile(pattern)
    for pattern in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)", r"(?:^|\.)ln_")
)




def warmup_steps(cfg: OptimizerConfig, total_steps: int) -> int:
    return math.ceil(cfg.warmup_ratio * total_steps)


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate at optimizer step `count`; a run's updates use counts 0 .. total_steps - 1.

    As in Hugging Face, the first update (count 0) has rate 0 whenever there is a warmup.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    warmup = warmup_steps(cfg, total_steps)
    peak = cfg.learning_rate
    decay_steps = max(1, total_steps - warmup)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, 0.0, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params: Any) -> Any:
    """True for the parameters that get weight decay: everything except biases and norm scales.

    This is what the Hugging Face Trainer does by default (`Trainer.get_decay_parameter_names`): it
    leaves out parameters whose dotted name contains `bias` or a norm (`layernorm`, `rmsnorm`,
    `norm`, `*_norm`) and every parameter of a LayerNorm module; embeddings and lm_head are decayed.
    """

    def decays(path: tuple[Any, ...], _leaf: Any) -> bool:
        name = ".".join(_key_name(key) for key in path).lower()
        return not any(pattern.search(name) for pattern in _NO_DECAY_PATTERNS)

    return jax.tree_util.tree_map_with_path(decays, params)


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(optimizer, schedule)`: clip by global norm, then AdamW with decoupled, masked weight decay."""
    schedule = make_schedule(cfg, total_steps)
    adamw = optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=weight_decay_mask
    )
    if cfg.max_grad_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw), schedule
