"""pdpo_jax: persona-consistent dialogue generation via pseudo preference tuning, in JAX/Flax.

The public API, stable across releases:

    import pdpo_jax
    model = pdpo_jax.load_model("default")                  # or an HF directory, or a stage's best/
    logits = pdpo_jax.forward_logits(model, input_ids, attention_mask)
    new_ids = pdpo_jax.generate(model, input_ids, attention_mask, max_new_tokens=32,
                                sampler=pdpo_jax.TopP(0.9), seed=0)
    replies = pdpo_jax.respond_to(model, persona=["i love cats ."], history=["hi ! any pets ?"])
    logps, counts = pdpo_jax.score_responses(model, persona, history, ["i have two cats .", "no ."])
    loss, metrics = pdpo_jax.preference_loss("simpo", chosen_logps, rejected_logps,
                                             chosen_tokens=chosen_counts, rejected_tokens=rejected_counts)

Names are loaded on first use, so `import pdpo_jax` (and the `pdpo` command) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Model": "pdpo_jax.model",
    "ModelConfig": "pdpo_jax.model",
    "load_model": "pdpo_jax.model",
    "export_hf": "pdpo_jax.model.export",
    "model_digest": "pdpo_jax.model.digest",
    "forward_logits": "pdpo_jax.conveniences",
    "respond_to": "pdpo_jax.conveniences",
    "score_responses": "pdpo_jax.conveniences",
    "generate": "pdpo_jax.generation",
    "Response": "pdpo_jax.generation",
    "Sampler": "pdpo_jax.generation",
    "Greedy": "pdpo_jax.generation",
    "Temperature": "pdpo_jax.generation",
    "TopK": "pdpo_jax.generation",
    "TopP": "pdpo_jax.generation",
    "sequence_scores": "pdpo_jax.scoring",
    "make_scorer": "pdpo_jax.scoring",
    "PromptEncoder": "pdpo_jax.data",
    "load_template": "pdpo_jax.data",
    "load_dialogues": "pdpo_jax.data",
    "examples_from_dialogues": "pdpo_jax.data",
    "read_dnli": "pdpo_jax.data",
    "inspect_file": "pdpo_jax.data",
    "RunConfig": "pdpo_jax.config",
    "load_config": "pdpo_jax.config",
    "sft_loss": "pdpo_jax.objectives",
    "dpo_loss": "pdpo_jax.objectives",
    "preference_loss": "pdpo_jax.objectives",
    "gae_advantages": "pdpo_jax.objectives",
    "kl_penalized_rewards": "pdpo_jax.objectives",
    "ppo_policy_loss": "pdpo_jax.objectives",
    "ppo_value_loss": "pdpo_jax.objectives",
    "Classifier": "pdpo_jax.model.classifier",
    "load_classifier": "pdpo_jax.model.classifier",
    "NliReward": "pdpo_jax.nli",
    "PdpoError": "pdpo_jax.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pdpo_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
