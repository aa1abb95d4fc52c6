"""`pdpo rl`: the RL(DialogueNLI) baseline, PPO from the SFT model against the NLI reward.

The policy starts from `rl.policy` (default `<run_dir>/sft/best`), which also stays the frozen
reference of the KL penalty; the reward is the `pdpo train-nli` classifier's (`rl.classifier`,
default `<run_dir>/nli/classifier`) judgement of each response against its persona
(`pdpo_jax.nli.reward`, `rl.reward`). Prompts are the persona + history of every training example
of the run's corpus; validation answers the validation examples greedily and the best model has
the highest mean validation reward. The PPO itself is `pdpo_jax.rl.ppo`.

Writes `<run_dir>/rl/` like the SFT stage (`checkpoints/`, `best/`, `metrics.jsonl` with TRL's
metric names, `tensorboard/`), `data_summary.json`, and `DONE`; a rerun resumes exactly.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from pdpo_jax.config import RunConfig
from pdpo_jax.errors import ModelDirError
from pdpo_jax.data import PromptEncoder, examples_from_dialogues
from pdpo_jax.data.corpus import prepare_corpus
from pdpo_jax.storage import atomic_write_json
from pdpo_jax.generation import context_limit, sampler_description, sampler_from_config
from pdpo_jax.metrics_log import read_metrics_jsonl
from pdpo_jax.model.classifier import load_classifier
from pdpo_jax.model.hub import looks_like_hub_id
from pdpo_jax.nli import NliReward
from pdpo_jax.parallel import is_primary
from pdpo_jax.rl import fit_ppo, rl_prompts
from pdpo_jax.run_layout import RunLayout
from pdpo_jax.stage_runner import load_for_run, run_command, run_once

STAGE = "rl"


class RLInputError(ModelDirError):
    """A model or the prompts the RL stage needs are not there; the message says which stage makes them."""


def resolve_inputs(config: RunConfig) -> tuple[str, Path]:
    """(policy, classifier): the policy a directory, `default` or a Hub id, the classifier a
    directory; checked before anything loads."""
    layout = RunLayout.of(config)
    policy, classifier = layout.rl_policy(config), layout.rl_classifier(config)
    named = config.rl.policy == "default" or looks_like_hub_id(config.rl.policy or "")
    if not named and not policy.is_dir():
        hint = " (run `pdpo sft` first, or set rl.policy)" if not config.rl.policy else ""
        raise RLInputError(f"policy model directory not found: {policy}{hint}")
    if not classifier.is_dir():
        hint = " (run `pdpo train-nli` first, or set rl.classifier)" if not config.rl.classifier else ""
        raise RLInputError(f"NLI classifier directory not found: {classifier}{hint}")
    return (config.rl.policy if named else str(policy)), classifier


def run_rl(config: RunConfig) -> dict[str, Any]:
    layout = RunLayout.of(config)
    return run_once(config, STAGE, layout.stage(STAGE), functools.partial(_train, config, layout),
                    batch_sizes={"rl.mini_batch_size": config.rl.mini_batch_size, "rl.batch_size": config.rl.batch_size},
                    result_line=lambda s: f"rl: best mean val reward {s['best_value']:.4f} at step {s['best_step']} "
                                          f"-> {s['best_dir']}")


def _train(config: RunConfig, layout: RunLayout, mesh: Any) -> dict[str, Any]:
    section, out_dir = config.rl, layout.stage(STAGE)
    policy_path, classifier_path = resolve_inputs(config)
    policy = load_for_run(policy_path, config, mesh)
    classifier = load_classifier(classifier_path, mesh=mesh, compute_dtype=config.model.dtype)
    reward = NliReward(classifier, section.reward, max_length=config.nli.max_length, mesh=mesh)
    encoder = PromptEncoder(policy.tokenizer, config.data.template)
    corpus = prepare_corpus(config.data, config.seed)
    room = context_limit(policy, config.data.max_length) - section.max_new_tokens
    train_prompts, train_skipped = rl_prompts(examples_from_dialogues(corpus.train), encoder, room=room,
                                              on_overflow=config.data.on_overflow)
    val_examples = examples_from_dialogues(corpus.val)[: section.max_val_examples]
    val_prompts, val_skipped = rl_prompts(val_examples, encoder, room=room, on_overflow=config.data.on_overflow)
    if not train_prompts or not val_prompts:
        raise RLInputError(f"no training or validation prompts left of the corpus ({len(train_prompts)} train, "
                           f"{len(val_prompts)} validation)")
    sampler = sampler_from_config(section.sampler.kind, temperature=section.sampler.temperature,
                                  top_k=section.sampler.top_k, top_p=section.sampler.top_p)
    if is_primary():
        atomic_write_json(layout.data_summary(STAGE), {
            **corpus.summary(), "policy_init": str(policy.path), "classifier": str(classifier.path),
            "reward": section.reward, "sampler": sampler_description(sampler),
            "train_prompts": len(train_prompts), "val_prompts": len(val_prompts),
            "skipped_too_long": {"train": train_skipped, "val": val_skipped},
        })
    summary = fit_ppo(policy=policy, reward=reward, encoder=encoder, train_prompts=train_prompts,
                      val_prompts=val_prompts, section=section, sampler=sampler,
                      length_bucket=config.data.length_bucket, out_dir=out_dir, mesh=mesh, seed=config.seed)
    summary["best_dir"] = str(layout.best_model(STAGE))
    summary["start_check"] = check_start(out_dir)
    return summary


def check_start(out_dir: Path) -> str:
    """The first rollout is sampled by the reference itself, so its KL must be 0 and the first
    update's policy ratio 1; anything else means the policy and the reference are not one model."""
    first = next((row for row in read_metrics_jsonl(out_dir / "metrics.jsonl")
                  if row.get("split") == "train" and row.get("step") == 1), None)
    if first is None:
        return "not applicable"
    kl = first.get("objective/kl")
    ratio = first.get("policy/ratio_first_update")
    if kl is not None and ratio is not None and abs(kl) < 1e-3 and abs(ratio - 1.0) < 1e-4:
        return f"ok: step-1 objective/kl {kl:.2e}, first-update ratio {ratio:.6f}"
    message = (f"step-1 objective/kl {kl} and first-update ratio {ratio} differ from 0 and 1: the policy did not "
               "start as the reference model")
    print(f"rl: WARNING: {message}", file=sys.stderr)
    return "mismatch: " + message


DESCRIPTION = ("RL(DialogueNLI): PPO from the SFT model (rl.policy, default <run_dir>/sft/best) against the NLI "
               "reward of the `pdpo train-nli` classifier (rl.classifier, default <run_dir>/nli/classifier) with a "
               "KL penalty to the SFT model; prompts from data.train, best = highest mean validation reward. "
               "Writes <run_dir>/rl/; a rerun resumes from the last checkpoint.")


def main(argv: list[str]) -> int:
    return run_command("pdpo rl", DESCRIPTION, run_rl, argv)
