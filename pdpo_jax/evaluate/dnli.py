"""Dialogue NLI evaluation: rank each example's candidate responses by log-likelihood.

    report, records = evaluate_dnli(load_model("default"), ["valid_havenot.jsonl"], DnliSettings())

For every example, each candidate is scored as a response to persona + history under the prompt
template: the summed log-probability of its tokens (the paper's ranking), or their mean with
`--length-normalized`. The top candidate's category (hits / entail / rand / contradict) is tallied
per data file (subset = file stem) and overall.

What is scored: the candidate's tokens followed by the end-of-turn token (EOS for plain
templates, the chat template's end-of-turn token for chat templates), because that is how
responses are trained and it also charges a candidate for leaving the turn unfinished.
`--no-end-of-turn` scores the candidate's tokens only.

The candidates of one example share the prompt, so each example is one row of the shared-prompt
layout (docs/design.md): the trunk `prompt[:-1]` once, then one branch per candidate,
`[prompt[-1]] + candidate`. Rows are sorted by length, grouped `--batch-examples` at a time and
padded to a multiple of `--bucket` tokens, so the jitted scorer compiles once per distinct length.
Scores come from `pdpo_jax.scoring.sequence_scores`, the function that also computes DPO's
reference log-probs. Ties go to the earlier candidate (the gold comes first).

Outputs, each written atomically: REPORT.json, REPORT.md (table), REPORT.png (bars) and
REPORT.examples.jsonl (one record per example with every candidate's score).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from pdpo_jax.data.batching import bucketed_length, empty_batch, shared_prompt_batch, with_scored_positions
from pdpo_jax.data.dnli import CATEGORIES, PROTOCOLS, DnliExample, read_dnli
from pdpo_jax.data.examples import Example
from pdpo_jax.data.templates import PromptTemplate, load_template
from pdpo_jax.data.tokenization import PromptEncoder
from pdpo_jax.errors import PdpoError
from pdpo_jax.evaluate.report import dnli_markdown, plot_dnli
from pdpo_jax.evaluate.score_journal import ScoreJournal
from pdpo_jax.model import Model, pad_id, require_tokenizer
from pdpo_jax.object_store import as_path
from pdpo_jax.parallel import rows_for_mesh
from pdpo_jax.scoring import Scorer, make_scorer
from pdpo_jax.storage import atomic_write_json, atomic_write_jsonl, atomic_write_text

SCORINGS = ("sum", "mean")  # summed log-likelihood (the paper), or per-token mean
DNLI_SUFFIXES = (".jsonl", ".json")


class DnliEvalError(PdpoError):
    """Inputs of a DNLI evaluation that cannot be used; the message says which."""


# --------------------------------------------------------------------------------------------
# Inputs


def read_subsets(paths: Sequence[str | os.PathLike], protocol: str) -> dict[str, list[DnliExample]]:
    """Examples of every file, keyed by subset name (the file stem). A file named twice, two files
    with the same stem, or a file that is not DNLI JSON Lines is an error; the names are checked
    before any file is read."""
    if not paths:
        raise DnliEvalError("no DNLI files given")
    named: dict[Path, str] = {}
    stems: dict[str, str] = {}
    for raw in paths:
        path = Path(raw)
        if path.resolve() in named:
            raise DnliEvalError(f"{raw}: DNLI file given twice (also as {named[path.resolve()]})")
        named[path.resolve()] = str(raw)
        if path.suffix.lower() not in DNLI_SUFFIXES:
            raise DnliEvalError(f"{raw}: unknown DNLI file format {path.suffix!r}; expected JSON Lines ({', '.join(DNLI_SUFFIXES)})")
        if path.stem in stems:
            raise DnliEvalError(f"{raw}: {stems[path.stem]} already has the subset name {path.stem!r} (names come from file stems)")
        stems[path.stem] = str(raw)
        if not path.is_file():
            raise DnliEvalError(f"{raw}: DNLI file not found")
    return {Path(raw).stem: read_dnli(raw, protocol) for raw in paths}


# --------------------------------------------------------------------------------------------
# Tokens and batches


@dataclass(frozen=True)
class EncodedExample:
    example: DnliExample
    subset: str
    prompt_ids: tuple[int, ...]
    candidate_ids: tuple[tuple[int, ...], ...]
    dropped_history_turns: int = 0

    @property
    def row_length(self) -> int:
        """Tokens of its shared-prompt row: trunk, then each branch's copied last prompt token + candidate."""
        return len(self.prompt_ids) - 1 + sum(1 + len(c) for c in self.candidate_ids)


def encode_example(example: DnliExample, subset: str, encoder: PromptEncoder, end_of_turn: bool = True,
                   max_length: int | None = None) -> EncodedExample:
    """Token ids of the prompt and of every candidate. Over `max_length` (prompt + the longest
    candidate, i.e. the largest position used), the oldest history turns are dropped first."""
    candidates = tuple(tuple(encoder.response_ids(text, end_of_turn=end_of_turn)) for text, _ in example.candidates)
    if any(not ids for ids in candidates):
        empty = next(text for (text, _), ids in zip(example.candidates, candidates) if not ids)
        raise DnliEvalError(f"{example.id}: candidate {empty!r} encodes to no tokens; score it with the end-of-turn token")
    prompt = tuple(encoder.prompt_ids(example.persona, example.history))
    longest = max(range(len(candidates)), key=lambda i: len(candidates[i]))
    if max_length is None or len(prompt) + len(candidates[longest]) <= max_length:
        return EncodedExample(example, subset, prompt, candidates)
    # The encoder's truncation counts the end-of-turn ids too, so with `end_of_turn=False` it may cut one turn early.
    as_turn = Example(id=example.id, dialogue_id=example.id, persona=example.persona, history=example.history,
                      response=example.candidates[longest][0])
    shortened = encoder.encode(as_turn, max_length)
    return EncodedExample(example, subset, shortened.prompt_ids, candidates, shortened.dropped_history_turns)


def plan_batches(lengths: Sequence[int], batch_examples: int) -> list[list[int]]:
    """Example indices grouped `batch_examples` at a time, longest rows first, so each batch pads
    little and the first compile is the largest shape (a memory error shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_examples] for i in range(0, len(order), batch_examples)]


def dnli_batch(encoded: Sequence[EncodedExample], rows: int, bucket: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One shared-prompt row per example, padded to `rows` rows and a multiple of `bucket` tokens.
    Sequence ids run over the candidates in order: example 0's first, then example 1's, ... The batch
    carries its `scored_positions`, so only candidate tokens are projected onto the vocabulary."""
    if len(encoded) > rows:
        raise ValueError(f"{len(encoded)} examples do not fit in {rows} rows")
    length = bucketed_length(max(e.row_length for e in encoded), bucket)
    batch = shared_prompt_batch([e.prompt_ids for e in encoded], [e.candidate_ids for e in encoded],
                                pad_to=length, pad_id=pad_id)
    if len(encoded) < rows:
        filler = empty_batch(rows - len(encoded), length, pad_id)
        batch = {key: np.concatenate([batch[key], filler[key]]) for key in batch}
    return with_scored_positions(batch)


# --------------------------------------------------------------------------------------------
# Scoring

@dataclass(frozen=True)
class ScoredExample:
    encoded: EncodedExample
    logps: np.ndarray  # summed log-prob of each candidate, in candidate order
    token_counts: np.ndarray

    def scores(self, scoring: str) -> np.ndarray:
        if scoring == "sum":
            return self.logps
        if scoring == "mean":
            return self.logps / np.maximum(self.token_counts, 1.0)
        raise ValueError(f"scoring must be one of {SCORINGS}, not {scoring!r}")

    def top(self, scoring: str) -> int:
        return int(np.argmax(self.scores(scoring)))  # first maximum: ties go to the earlier candidate


def score_examples(encoded: Sequence[EncodedExample], scorer: Scorer, batch_examples: int, bucket: int,
                   candidates_per_row: int, pad_id: int = 0,
                   progress: Callable[[int], None] | None = None,
                   journal: ScoreJournal | None = None) -> list[ScoredExample]:
    """Every example's candidate log-probs, in the order given. `candidates_per_row` is the most
    candidates any example has: the scorer's `num_sequences` is `batch_examples * candidates_per_row`.
    With a `journal`, the batches it kept are taken from it and each batch scored is recorded in it."""
    results: list[ScoredExample | None] = [None] * len(encoded)
    plan = plan_batches([e.row_length for e in encoded], batch_examples)
    for number, indices in enumerate(plan):
        members = [encoded[i] for i in indices]
        ids = [member.example.id for member in members]
        scores = journal.kept_scores(number, ids) if journal is not None else None
        if scores is None:
            scores = _score_batch(members, scorer, batch_examples, bucket, candidates_per_row, pad_id)
            if journal is not None:
                journal.record(number, ids, scores)
        for index, member, (logps, counts) in zip(indices, members, scores):
            results[index] = ScoredExample(member, logps, counts)
        if progress is not None:
            progress(len(members))
    return [r for r in results if r is not None]


def _score_batch(members: Sequence[EncodedExample], scorer: Scorer, batch_examples: int, bucket: int,
                 candidates_per_row: int, pad_id: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(summed log-probs, token counts) of each member's candidates, from one scorer call."""
    logps, counts = scorer(dnli_batch(members, batch_examples, bucket, pad_id))
    scores, start = [], 0
    for member in members:
        end = start + len(member.candidate_ids)
        if np.any(counts[start:end] == 0):
            raise RuntimeError(f"{member.example.id}: a candidate got no scored tokens (batch layout mismatch)")
        scores.append((logps[start:end].copy(), counts[start:end].copy()))
        start = end
    if start > batch_examples * candidates_per_row:
        raise ValueError(f"{start} candidates in one batch, more than num_sequences={batch_examples * candidates_per_row}")
    return scores


# --------------------------------------------------------------------------------------------
# Tallies and the report


def tally(predicted_categories: Sequence[str]) -> dict[str, Any]:
    """Counts and percentages of each category among the top candidates; percentages sum to 100."""
    n = len(predicted_categories)
    counts = {c: sum(1 for p in predicted_categories if p == c) for c in CATEGORIES}
    percentages = {c: (100.0 * counts[c] / n if n else None) for c in CATEGORIES}
    return {"n": n, "counts": counts, "percentages": percentages}


def example_record(scored: ScoredExample, scoring: str) -> dict[str, Any]:
    example = scored.encoded.example
    scores = scored.scores(scoring)
    top = scored.top(scoring)
    return {
        "id": example.id,
        "subset": scored.encoded.subset,
        "predicted_index": top,
        "predicted_category": example.candidates[top][1],
        "predicted_text": example.candidates[top][0],
        "gold_rank": int(np.sum(scores > scores[0])) + 1,
        "dropped_history_turns": scored.encoded.dropped_history_turns,
        "categories": [category for _, category in example.candidates],
        "scores": [round(float(s), 6) for s in scores],
        "logps": [round(float(s), 6) for s in scored.logps],
        "token_counts": [int(c) for c in scored.token_counts],
    }


def build_report(records: Sequence[dict[str, Any]], subsets: Sequence[str], **header: Any) -> dict[str, Any]:
    """The report of pdpo_jax.evaluate.report: `header` fields, then per-subset and overall tallies."""
    per_subset = {name: tally([r["predicted_category"] for r in records if r["subset"] == name]) for name in subsets}
    return {**header, "subsets": per_subset, "overall": tally([r["predicted_category"] for r in records])}


def output_paths(report_path: str | os.PathLike) -> dict[str, Path]:
    """REPORT.json and, beside it, REPORT.md, REPORT.png, REPORT.examples.jsonl and, while the
    evaluation runs, REPORT.partial.jsonl."""
    path = as_path(report_path)  # a local path, or gs://
    report = path if path.suffix.lower() == ".json" else as_path(f"{path}.json")
    base = report.with_suffix("")
    return {
        "json": report,
        "markdown": as_path(f"{base}.md"),
        "plot": as_path(f"{base}.png"),
        "examples": as_path(f"{base}.examples.jsonl"),
        "journal": as_path(f"{base}.partial.jsonl"),  # the scores so far, while it runs (score_journal)
    }


def write_outputs(report: dict[str, Any], records: Sequence[dict[str, Any]], report_path: str | os.PathLike) -> dict[str, Path]:
    paths = output_paths(report_path)
    report = dict(report, files={k: paths[k].name for k in ("markdown", "plot", "examples")})
    atomic_write_jsonl(paths["examples"], list(records))
    atomic_write_text(paths["markdown"], dnli_markdown(report) + _settings_line(report) + "\n")
    plot_dnli(report, paths["plot"])
    atomic_write_json(paths["json"], report)  # last: its presence means the evaluation finished
    if paths["journal"].exists():  # the scores it kept are in the report now
        paths["journal"].unlink()
    return paths


def _settings_line(report: dict[str, Any]) -> str:
    eot = "with" if report.get("end_of_turn") else "without"
    return (f"\nScoring: {report.get('scoring_description', report.get('scoring'))} of each candidate {eot} the "
            f"end-of-turn token; template {report.get('template')}; model path {report.get('model_path')}.\n")


# --------------------------------------------------------------------------------------------
# The whole evaluation


@dataclass(frozen=True)
class DnliSettings:
    protocol: str = "31"
    scoring: str = "sum"
    template: str | dict | PromptTemplate = "chat-en"
    end_of_turn: bool = True
    batch_examples: int = 8
    bucket: int = 128
    max_examples: int | None = None  # per file: the first N examples
    max_length: int | None = None  # None: the model's max_position_embeddings

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise DnliEvalError(f"protocol must be one of {PROTOCOLS}, not {self.protocol!r}")
        if self.scoring not in SCORINGS:
            raise DnliEvalError(f"scoring must be one of {SCORINGS}, not {self.scoring!r}")
        for name in ("batch_examples", "bucket", "max_examples", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DnliEvalError(f"{name} must be positive, got {value}")


def evaluate_dnli(model: Model, data: Sequence[str | os.PathLike], settings: DnliSettings, *, mesh: Any = None,
                  model_name: str | None = None, show_progress: bool = False,
                  resume_from: str | os.PathLike | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(report, per-example records) of a loaded model on DNLI files. With `resume_from` (the
    report's path), the scores are journaled beside it as they are computed, and a rerun after a
    stop takes the batches scored before (`score_journal`); `write_outputs` removes the journal."""
    tokenizer = require_tokenizer(model)
    subsets = read_subsets(data, settings.protocol)
    if settings.max_examples is not None:
        subsets = {name: examples[: settings.max_examples] for name, examples in subsets.items()}
    template = load_template(settings.template)
    encoder = PromptEncoder(tokenizer, template)
    max_length = settings.max_length or model.config.max_position_embeddings
    encoded = [
        encode_example(example, name, encoder, settings.end_of_turn, max_length)
        for name, examples in subsets.items()
        for example in examples
    ]
    rows = rows_for_mesh(settings.batch_examples, mesh)
    candidates_per_row = max(len(e.candidate_ids) for e in encoded)
    scorer = make_scorer(model, rows * candidates_per_row, mesh)
    pad = pad_id(model)
    shapes = {bucketed_length(max(encoded[i].row_length for i in group), settings.bucket)
              for group in plan_batches([e.row_length for e in encoded], rows)}

    journal = None
    if resume_from is not None:
        header = {"model_path": str(model.path), "data": [str(p) for p in data], "protocol": settings.protocol,
                  "template": template.to_dict(), "end_of_turn": settings.end_of_turn, "bucket": settings.bucket,
                  "rows": rows, "max_examples": settings.max_examples, "max_length": max_length}
        journal = ScoreJournal(output_paths(resume_from)["journal"], header)
    start = time.perf_counter()
    with _progress_bar(len(encoded), show_progress) as advance:
        scored = score_examples(encoded, scorer, rows, settings.bucket, candidates_per_row, pad, advance, journal)
    seconds = time.perf_counter() - start

    records = [example_record(s, settings.scoring) for s in scored]
    num_candidates = sum(len(e.candidate_ids) for e in encoded)
    report = build_report(
        records,
        list(subsets),
        model=model_name or str(model.path),
        model_path=str(model.path),
        protocol=settings.protocol,
        scoring=settings.scoring,
        scoring_description="summed log-likelihood" if settings.scoring == "sum" else "length-normalized (per-token mean) log-likelihood",
        end_of_turn=settings.end_of_turn,
        template=settings.template if isinstance(settings.template, str) else template.to_dict(),
        data={name: str(Path(p)) for name, p in zip(subsets, data)},
        max_examples_per_file=settings.max_examples,
        truncated_examples=sum(1 for e in encoded if e.dropped_history_turns),
        candidates=num_candidates,
        batch_examples=rows,
        compiled_lengths=sorted(shapes),
        seconds=round(seconds, 3),
        candidates_per_second=round(num_candidates / seconds, 2) if seconds > 0 else None,
    )
    return report, records


class _progress_bar:
    """tqdm over examples on stderr when asked for and on the first process; otherwise nothing."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None

    def __enter__(self) -> Callable[[int], None]:
        if self.enabled:
            self.bar = tqdm(total=self.total, unit="ex", desc="DNLI", file=sys.stderr, dynamic_ncols=True)
            return self.bar.update
        return lambda n: None

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
