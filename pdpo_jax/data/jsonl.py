"""The project's own dialogue layout: JSON Lines, one dialogue per line.

    {"id": "d1", "persona": ["i like cats ."],
     "turns": [{"speaker": "partner", "text": "hi"}, {"speaker": "model", "text": "hello !"}],
     "partner_persona": ["i like dogs ."]}

`speaker` is "model" (the speaker whose `persona` is given) or "partner"; speakers alternate.
`partner_persona` is optional. Ids must be unique within a file. An optional "conversation_id" ties
several views of one conversation together (it defaults to the id).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pdpo_jax.data.dialogue import SPEAKERS, Dialogue, Turn, with_swapped
from pdpo_jax.data.fields import string_list
from pdpo_jax.errors import DataError
from pdpo_jax.storage import atomic_write_text, json_lines


def read_dialogue_jsonl(path: str | Path, both_speakers: bool = False) -> list[Dialogue]:
    dialogues: list[Dialogue] = []
    seen: dict[str, int] = {}
    for number, record in json_lines(path):
        dialogue = _dialogue(record, path, number)
        if dialogue.id in seen:
            raise DataError(path, number, f"id {dialogue.id!r} already used on line {seen[dialogue.id]}")
        seen[dialogue.id] = number
        dialogues.append(dialogue)
    return with_swapped(dialogues) if both_speakers else dialogues


def _dialogue(record: dict, path: str | Path, number: int) -> Dialogue:
    for key in ("id", "persona", "turns"):
        if key not in record:
            raise DataError(path, number, f"missing key {key!r}")
    if not isinstance(record["id"], str) or not record["id"]:
        raise DataError(path, number, "'id' must be a non-empty string")
    persona = string_list(record["persona"], path, number, "persona")
    partner = record.get("partner_persona")
    partner_persona = None if partner is None else string_list(partner, path, number, "partner_persona")
    if not isinstance(record["turns"], list) or not record["turns"]:
        raise DataError(path, number, "'turns' must be a non-empty list")
    turns = []
    for position, turn in enumerate(record["turns"]):
        if not isinstance(turn, dict) or turn.get("speaker") not in SPEAKERS or not isinstance(turn.get("text"), str):
            raise DataError(path, number, f"turns[{position}] must be {{'speaker': 'model'|'partner', 'text': str}}")
        turns.append(Turn(turn["speaker"], turn["text"].strip()))
    try:
        conversation = record.get("conversation_id", "")
        if not isinstance(conversation, str):
            raise ValueError("'conversation_id' must be a string")
        return Dialogue(record["id"], persona, partner_persona, tuple(turns), str(path), conversation)
    except ValueError as err:
        raise DataError(path, number, str(err)) from None


def dialogue_to_json(dialogue: Dialogue) -> dict:
    record = {
        "id": dialogue.id,
        "persona": list(dialogue.persona),
        "turns": [{"speaker": t.speaker, "text": t.text} for t in dialogue.turns],
    }
    if dialogue.partner_persona is not None:
        record["partner_persona"] = list(dialogue.partner_persona)
    if dialogue.conversation_id != dialogue.id:
        record["conversation_id"] = dialogue.conversation_id
    return record


def write_dialogue_jsonl(path: str | Path, dialogues: Iterable[Dialogue]) -> None:
    """Write dialogues in the layout `read_dialogue_jsonl` reads (atomically)."""
    lines = [json.dumps(dialogue_to_json(d), ensure_ascii=False) + "\n" for d in dialogues]
    atomic_write_text(path, "".join(lines))
