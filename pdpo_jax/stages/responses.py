"""`pdpo test-responses`: every trained model of a run answers the test dialogues' turns. These
files are what the judge stage compares and what a human study is built from (`pdpo annotate init`).

`<run_dir>/test_responses/<stage>.jsonl`, one file per trained model (`sft.jsonl`: SFT,
`dpo.jsonl`: PseudoDPO), one line per test turn in the format `pdpo judge --responses` reads:

    {"id", "dialogue_id", "persona", "history", "response", "model", "reference", "stopped",
     "history_turns_dropped"}

The turns are the test split's model turns that answer a partner line: all of them, or
`test_responses.max_examples` picked with `test_responses.seed`. Every model answers the same
turns with the configured sampler and the same seeds (batch b: seed + b). `history` is the whole
dialogue so far, as the judge and annotators read it; when the context was too short the model saw
all but its `history_turns_dropped` oldest turns. `reference` is the dialogue's own response.

Each model's file is written atomically and skipped on a rerun; DONE is written last.
"""

from __future__ import annotations

import functools
from typing import Any

from pdpo_jax.config import ConfigError, RunConfig
from pdpo_jax.data import PromptEncoder
from pdpo_jax.data.corpus import pick_test_turns, prepare_corpus
from pdpo_jax.errors import ModelDirError
from pdpo_jax.storage import atomic_write_jsonl
from pdpo_jax.generation import respond_to_conversations, sampler_description, sampler_from_config
from pdpo_jax.parallel import barrier, is_primary, primary_decides
from pdpo_jax.run_layout import RESPONDING_MODELS, RunLayout
from pdpo_jax.stage_runner import load_for_run, run_command, run_once


def write_test_responses(config: RunConfig) -> dict[str, Any]:
    """Writes (or completes) `<run_dir>/test_responses`; returns the summary kept in its DONE."""
    layout = RunLayout.of(config)
    files = {"files": {stage: str(layout.responses(stage)) for stage in RESPONDING_MODELS}}
    return run_once(config, "test-responses", layout.test_responses, functools.partial(_answer, config, layout),
                    when_finished=lambda _: files)


def _answer(config: RunConfig, layout: RunLayout, mesh: Any) -> dict[str, Any]:
    section = config.test_responses
    turns = pick_test_turns(prepare_corpus(config.data, config.seed), section.max_examples, section.seed)
    if not turns:
        raise ConfigError("test-responses: the run's corpus has no test turns to answer; give the test split a share "
                          "(the third of data.split_fractions, or data.test_fraction with data.val files)")
    sampler = sampler_from_config(section.sampler.kind, temperature=section.sampler.temperature,
                                  top_k=section.sampler.top_k, top_p=section.sampler.top_p)
    for stage, name in RESPONDING_MODELS.items():
        path = layout.responses(stage)
        if primary_decides(path.exists):
            continue
        best = layout.trained_model(config, stage)
        if not best.is_dir():
            raise ModelDirError(f"{best}: not found; the {stage} stage must finish before test-responses")
        model = load_for_run(best, config, mesh=mesh)
        answered = respond_to_conversations(
            model, PromptEncoder(model.tokenizer, config.data.template), [(t.persona, t.history) for t in turns],
            max_new_tokens=section.max_new_tokens, sampler=sampler, seed=section.seed,
            batch_size=section.batch_size, max_length=config.data.max_length, mesh=mesh)
        if is_primary():
            atomic_write_jsonl(path, [
                {"id": turn.id, "dialogue_id": turn.dialogue_id, "persona": list(turn.persona),
                 "history": list(turn.history), "response": response.text, "model": name,
                 "reference": turn.response, "stopped": response.stopped, "history_turns_dropped": dropped}
                for turn, (response, dropped) in zip(turns, answered)])
        barrier(f"test-responses-{stage}")
    return {"turns": len(turns), "sampler": sampler_description(sampler), "seed": section.seed,
            "max_new_tokens": section.max_new_tokens,
            "files": {stage: str(layout.responses(stage)) for stage in RESPONDING_MODELS}}


DESCRIPTION = (
    "Every trained model of the run (<run_dir>/sft/best and <run_dir>/dpo/best, the last round's with dpo.rounds > 1) "
    "answers the test dialogues' turns with the test_responses sampler and seed. Writes <run_dir>/test_responses/{sft,dpo}.jsonl in the format "
    "`pdpo judge --responses` and `pdpo annotate init --pairs` read, then DONE."
)


def report(summary: dict[str, Any], config: RunConfig) -> None:
    print("test responses: " + ", ".join(summary["files"].values()))


def main(argv: list[str]) -> int:
    return run_command("pdpo test-responses", DESCRIPTION, write_test_responses, argv, report)
