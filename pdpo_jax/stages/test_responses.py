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

from pathlib import Path
from typing import Any

from pdpo_jax.config import ConfigError, RunConfig
from pdpo_jax.data import PromptEncoder
from pdpo_jax.data.corpus import pick_test_turns, prepare_corpus
from pdpo_jax.errors import ModelDirError
from pdpo_jax.storage import atomic_write_jsonl, mark_done
from pdpo_jax.generation import respond_to_conversations, sampler_description, sampler_from_config
from pdpo_jax.parallel import barrier, is_primary, primary_decides
from pdpo_jax.stages.common import (
    build_mesh,
    claim_run_dir,
    finished,
    load_for_run,
    parse_stage_args,
    write_resolved_config,
)

# The trained models of a run: stage folder -> the model's name in its responses file.
TRAINED_MODELS = {"sft": "SFT", "dpo": "PseudoDPO"}
STAGE_DIR = "test_responses"


def responses_path(config: RunConfig, stage: str) -> Path:
    return Path(config.run_dir) / STAGE_DIR / f"{stage}.jsonl"


def write_test_responses(config: RunConfig) -> dict[str, Any]:
    """Writes (or completes) `<run_dir>/test_responses`; returns the summary kept in its DONE."""
    out_dir = Path(config.run_dir) / STAGE_DIR
    mesh = build_mesh(config)
    if finished(out_dir):
        print(f"test-responses: already finished in {out_dir} (delete its DONE file to rerun)")
        return {"files": {stage: str(responses_path(config, stage)) for stage in TRAINED_MODELS}}
    section = config.test_responses
    turns = pick_test_turns(prepare_corpus(config.data, config.seed), section.max_examples, section.seed)
    if not turns:
        raise ConfigError("test-responses: the run's corpus has no test turns to answer; give the test split a share "
                          "(the third of data.split_fractions, or data.test_fraction with data.val files)")
    sampler = sampler_from_config(section.sampler.kind, temperature=section.sampler.temperature,
                                  top_k=section.sampler.top_k, top_p=section.sampler.top_p)
    write_resolved_config(config)
    for stage, name in TRAINED_MODELS.items():
        path = responses_path(config, stage)
        if primary_decides(path.exists):
            continue
        best = Path(config.run_dir) / stage / "best"
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
    summary = {"turns": len(turns), "sampler": sampler_description(sampler), "seed": section.seed,
               "max_new_tokens": section.max_new_tokens,
               "files": {stage: str(responses_path(config, stage)) for stage in TRAINED_MODELS}}
    if is_primary():
        mark_done(out_dir, summary)
    barrier("test-responses")
    return summary


DESCRIPTION = (
    "Every trained model of the run (<run_dir>/sft/best and <run_dir>/dpo/best) answers the test dialogues' turns "
    "with the test_responses sampler and seed. Writes <run_dir>/test_responses/{sft,dpo}.jsonl in the format "
    "`pdpo judge --responses` and `pdpo annotate init --pairs` read, then DONE."
)


def main(argv: list[str]) -> int:
    config = parse_stage_args(argv, "pdpo test-responses", DESCRIPTION)
    with claim_run_dir(config):
        summary = write_test_responses(config)
    print("test responses: " + ", ".join(summary["files"].values()))
    return 0
