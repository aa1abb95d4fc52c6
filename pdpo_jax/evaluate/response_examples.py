"""Generated responses side by side, in the layout of the paper's Table 5: persona, history, then
each model's response to the same conversation.

    conversations = read_conversations("talks.jsonl")                  # {"id", "persona", "history"}
    responses = {"SFT": read_responses("sft.jsonl"), "PseudoDPO": read_responses("dpo.jsonl")}
    text = response_examples_markdown(conversations, responses, count=5, seed=0)

The response files are what `pdpo generate --input talks.jsonl --output X.jsonl` writes (the input
records plus "response"), matched to the conversations by id; a response whose persona or history
differs from the conversation's was generated for another input, and is refused. Which
conversations are shown is a seeded draw without replacement (not the first lines: consecutive
lines are usually turns of one dialogue), listed in file order.

Above the examples, a table measures over every conversation how much each model copies its
persona (`persona_copy`): the known failure of a consistency-only reward is a model that repeats
persona facts verbatim instead of answering.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from pdpo_jax.data.persona_copy import COPY_THRESHOLD, persona_copy
from pdpo_jax.errors import PdpoError
from pdpo_jax.storage import jsonl_objects

__all__ = ["ResponseExamplesError", "persona_copy", "read_conversations", "read_responses", "response_examples_markdown"]


class ResponseExamplesError(PdpoError):
    """A conversation or response file that cannot be shown; the message names the file and line."""


def _strings(item: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = item.get(key)
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ResponseExamplesError(f"{where}: {key!r} must be a list of strings")
    return value


def read_conversations(path: str | os.PathLike) -> list[dict[str, Any]]:
    """`{"id", "persona", "history"}` per line; ids must be unique strings."""
    conversations, seen = [], set()
    for where, item in jsonl_objects(path, ResponseExamplesError):
        if not isinstance(item.get("id"), str) or item["id"] in seen:
            raise ResponseExamplesError(f"{where}: every conversation needs a unique string 'id'")
        seen.add(item["id"])
        conversations.append({"id": item["id"], "persona": _strings(item, "persona", where),
                              "history": _strings(item, "history", where), "where": where})
    if not conversations:
        raise ResponseExamplesError(f"{path}: no conversations")
    return conversations


def read_responses(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """id -> generate's output record (with "response" and the "where" it was read)."""
    responses: dict[str, dict[str, Any]] = {}
    for where, item in jsonl_objects(path, ResponseExamplesError):
        if not isinstance(item.get("id"), str):
            raise ResponseExamplesError(f"{where}: no string 'id' to match the conversation by")
        if not isinstance(item.get("response"), str):
            raise ResponseExamplesError(f"{where}: no string 'response'")
        responses[item["id"]] = {**item, "where": where}
    return responses


def persona_copy_markdown(conversations: Sequence[Mapping[str, Any]],
                          responses: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Per model, over the conversations it answered: the mean `persona_copy` and how many responses
    copy a persona sentence (at least COPY_THRESHOLD of its word pairs)."""
    lines = ["| model | responses | mean persona copy | copying a persona sentence |", "| --- | --- | --- | --- |"]
    for model, by_id in responses.items():
        copies = [persona_copy(c["persona"], by_id[c["id"]]["response"]) for c in conversations if c["id"] in by_id]
        copying = sum(share >= COPY_THRESHOLD for share in copies)
        mean = sum(copies) / len(copies) if copies else float("nan")
        lines.append(f"| {model} | {len(copies)} | {mean:.3f} | {copying} ({100 * copying / max(len(copies), 1):.1f}%) |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def _history_lines(history: Sequence[str]) -> str:
    # The last line is the partner's, and the speakers alternate before it.
    speakers = ["Partner" if (len(history) - i) % 2 else "Self" for i in range(len(history))]
    return "<br>".join(f"{s}: {_cell(u)}" for s, u in zip(speakers, history)) or "(the model speaks first)"


def response_examples_markdown(conversations: Sequence[Mapping[str, Any]],
                               responses: Mapping[str, Mapping[str, Mapping[str, Any]]],
                               count: int, seed: int = 0) -> str:
    """`count` conversations (a seeded draw, in file order) as persona / history / one row per model."""
    if count < 1:
        raise ResponseExamplesError(f"the number of examples must be positive, got {count}")
    if not responses:
        raise ResponseExamplesError("no response files given")
    picks = sorted(np.random.default_rng([seed, 5]).choice(len(conversations), size=min(count, len(conversations)),
                                                           replace=False).tolist())
    parts = []
    for number, index in enumerate(picks, 1):
        conversation = conversations[index]
        rows = [("Persona", "<br>".join(_cell(s) for s in conversation["persona"])),
                ("History", _history_lines(conversation["history"]))]
        for model, by_id in responses.items():
            record = by_id.get(conversation["id"])
            if record is None:
                raise ResponseExamplesError(f"{conversation['where']}: conversation {conversation['id']!r} has no response of {model!r}")
            for key in ("persona", "history"):
                if key in record and record[key] != conversation[key]:
                    raise ResponseExamplesError(f"{record['where']}: the {key} of {conversation['id']!r} differs from "
                                                f"{conversation['where']} (responses to another input?)")
            rows.append((model, _cell(record["response"])))
        table = "\n".join(["| | |", "| --- | --- |", *(f"| **{name}** | {text} |" for name, text in rows)])
        parts.append(f"### Example {number}: {conversation['id']}\n\n{table}\n")
    summary = (f"Persona copying over all {len(conversations)} conversations (the share of a persona sentence's "
               f"adjacent word pairs a response repeats, its largest over the sentences; copying = at least "
               f"{COPY_THRESHOLD:.0%}):\n\n{persona_copy_markdown(conversations, responses)}\n")
    return "\n".join([summary, *parts])
