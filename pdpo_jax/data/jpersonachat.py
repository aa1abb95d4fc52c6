"""JPersonaChat (Sugiyama et al. 2023) and the same data in two plain layouts.

Accepted layouts, told apart by the file:

1. The released workbook (`japanese_persona_chat.xlsx`), read by column position: sheet
   `ペルソナリスト` has a header row (first cell `No`) and one row per dialogue
   [No, dialogue id, persona of A, persona of B], a persona cell holding one sentence per line;
   sheet `対話` has a header row and one row per utterance [No, dialogue id, speaker A/B, utterance].
2. A table with a header row naming the columns `dialogue_id`, `speaker` and `text` (extra columns
   are ignored), as a tab-separated `.tsv` file or as the first sheet of an `.xlsx` workbook.
   `speaker` is `A` or `B` for an utterance, `persona:A` or `persona:B` for one persona sentence.
   Rows of one dialogue are consecutive and in order. Example:

       dialogue_id	speaker	text
       PP1	persona:A	私は猫を飼っています。
       PP1	persona:B	私は東京に住んでいます。
       PP1	A	こんにちは。
       PP1	B	こんにちは、よろしくお願いします。

3. JSON Lines, one dialogue per line:
   {"dialogue_id": "PP1", "persona_A": [...], "persona_B": [...],
    "utterances": [{"speaker": "A", "text": "..."}, ...]}

The modelled speaker needs a persona; the other one's is kept when present. `model_speaker` (default "B", who answers the opener A, as the model
does in PersonaChat's "self" files) is the speaker the model plays; `both_speakers` adds the other
view of every conversation. Line breaks inside an utterance are removed; consecutive utterances of
one speaker are joined with a space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pdpo_jax.data.dialogue import MODEL, PARTNER, Dialogue, alternating_turns, with_swapped
from pdpo_jax.data.fields import string_list
from pdpo_jax.errors import DataError
from pdpo_jax.storage import json_lines, text_lines

PERSONA_SHEET = "ペルソナリスト"
DIALOGUE_SHEET = "対話"
TABLE_COLUMNS = ("dialogue_id", "speaker", "text")
SPEAKER_NAMES = ("A", "B")


@dataclass
class _Conversation:
    first_line: int
    persona: dict[str, list[str]] = field(default_factory=lambda: {"A": [], "B": []})
    utterances: list[tuple[str, str]] = field(default_factory=list)


def read_jpersonachat(path: str | Path, model_speaker: str = "B", both_speakers: bool = False) -> list[Dialogue]:
    if model_speaker not in SPEAKER_NAMES:
        raise ValueError(f"model_speaker must be 'A' or 'B', not {model_speaker!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xlsm"):
        conversations = _read_workbook(path)
    elif suffix == ".jsonl":
        conversations = _read_jsonl(path)
    else:
        conversations = _read_table(path, _tsv_rows(path), "line")
    dialogues = [_dialogue(path, key, conv, model_speaker) for key, conv in conversations.items()]
    return with_swapped(dialogues) if both_speakers else dialogues


def _clean(text: str) -> str:
    return "".join(part.strip() for part in str(text).splitlines()).strip()


def _tsv_rows(path: Path) -> list[tuple[int, list[str]]]:
    return [(number, line.split("\t")) for number, line in text_lines(path) if line.strip()]


def _read_table(path: Path, rows: list[tuple[int, list[str]]], unit: str) -> dict[str, _Conversation]:
    if not rows:
        raise DataError(path, None, "empty file")
    header_line, header = rows[0]
    names = [str(cell).strip() for cell in header]
    missing = [name for name in TABLE_COLUMNS if name not in names]
    if missing:
        raise DataError(path, header_line, f"header must name the columns {TABLE_COLUMNS}; missing {missing}")
    column = {name: names.index(name) for name in TABLE_COLUMNS}
    conversations: dict[str, _Conversation] = {}
    for number, cells in rows[1:]:
        if len(cells) <= max(column.values()):
            raise DataError(path, number, f"{unit} has {len(cells)} column(s); missing tab or cell (expected {len(names)})")
        key, speaker, text = (str(cells[column[name]]).strip() for name in TABLE_COLUMNS)
        conv = _conversation(conversations, key, path, number)
        if speaker.startswith("persona:") and speaker[len("persona:"):] in SPEAKER_NAMES:
            conv.persona[speaker[len("persona:"):]].append(_nonempty(text, path, number))
        elif speaker in SPEAKER_NAMES:
            conv.utterances.append((speaker, _nonempty(_clean(text), path, number)))
        else:
            raise DataError(path, number, f"speaker {speaker!r} is not A, B, persona:A or persona:B")
    return conversations


def _conversation(conversations: dict[str, _Conversation], key: str, path: Path, number: int) -> _Conversation:
    if not key:
        raise DataError(path, number, "empty dialogue id")
    if key in conversations:
        if key != next(reversed(conversations)):
            raise DataError(path, number, f"rows of dialogue {key!r} are not consecutive")
        return conversations[key]
    conversations[key] = _Conversation(first_line=number)
    return conversations[key]


def _nonempty(text: str, path: Path, number: int) -> str:
    if not text:
        raise DataError(path, number, "empty text")
    return text


def _read_jsonl(path: Path) -> dict[str, _Conversation]:
    conversations: dict[str, _Conversation] = {}
    for number, record in json_lines(path):
        key = record.get("dialogue_id")
        if not isinstance(key, str) or not key:
            raise DataError(path, number, "'dialogue_id' must be a non-empty string")
        if key in conversations:
            raise DataError(path, number, f"dialogue id {key!r} appears twice")
        conv = conversations[key] = _Conversation(first_line=number)
        for name in SPEAKER_NAMES:
            conv.persona[name] = list(string_list(record.get(f"persona_{name}", []), path, number, f"persona_{name}", allow_empty=True))
        utterances = record.get("utterances")
        if not isinstance(utterances, list):
            raise DataError(path, number, "'utterances' must be a list")
        for position, item in enumerate(utterances):
            if not isinstance(item, dict) or item.get("speaker") not in SPEAKER_NAMES or not isinstance(item.get("text"), str):
                raise DataError(path, number, f"utterances[{position}] must be {{'speaker': 'A'|'B', 'text': str}}")
            conv.utterances.append((item["speaker"], _nonempty(_clean(item["text"]), path, number)))
    return conversations


def _read_workbook(path: Path) -> dict[str, _Conversation]:
    import pandas as pd

    try:
        sheets = pd.read_excel(path, sheet_name=None, header=None, dtype=str, keep_default_na=False)
    except Exception as err:  # openpyxl raises several types for damaged files
        raise DataError(path, None, f"cannot be read as an Excel workbook: {err}") from err
    rows = {name: [(i + 1, list(r)) for i, r in enumerate(frame.itertuples(index=False, name=None))] for name, frame in sheets.items()}
    if PERSONA_SHEET in rows and DIALOGUE_SHEET in rows:
        return _read_release(path, rows[PERSONA_SHEET], rows[DIALOGUE_SHEET])
    first = next(iter(rows.values()), [])
    return _read_table(path, [(n, cells) for n, cells in first if any(str(c).strip() for c in cells)], "row")


def _read_release(path: Path, persona_rows, dialogue_rows) -> dict[str, _Conversation]:
    def body(rows, sheet):
        for number, cells in rows:
            if not any(str(c).strip() for c in cells) or str(cells[0]).strip() == "No":
                continue
            if len(cells) < 4:
                raise DataError(path, number, f"sheet {sheet}: expected 4 columns, found {len(cells)}")
            yield number, [str(c) for c in cells]

    conversations: dict[str, _Conversation] = {}
    for number, cells in body(dialogue_rows, DIALOGUE_SHEET):
        key, speaker = cells[1].strip(), cells[2].strip()
        if speaker not in SPEAKER_NAMES:
            raise DataError(path, number, f"sheet {DIALOGUE_SHEET}: speaker {speaker!r} is not A or B")
        _conversation(conversations, key, path, number).utterances.append((speaker, _nonempty(_clean(cells[3]), path, number)))
    for number, cells in body(persona_rows, PERSONA_SHEET):
        key = cells[1].strip()
        if key not in conversations:
            raise DataError(path, number, f"sheet {PERSONA_SHEET}: dialogue {key!r} has no utterances in sheet {DIALOGUE_SHEET}")
        for name, cell in zip(SPEAKER_NAMES, cells[2:4]):
            conversations[key].persona[name] = [s.strip() for s in cell.splitlines() if s.strip()]
    return conversations


def _dialogue(path: Path, key: str, conv: _Conversation, model_speaker: str) -> Dialogue:
    other = "A" if model_speaker == "B" else "B"
    if not conv.persona[model_speaker]:
        raise DataError(path, conv.first_line, f"dialogue {key!r} without persona for speaker {model_speaker}")
    if not conv.utterances:
        raise DataError(path, conv.first_line, f"dialogue {key!r} has no utterances")
    turns = alternating_turns([(MODEL if s == model_speaker else PARTNER, t) for s, t in conv.utterances])
    return Dialogue(f"{path.stem}:{key}", tuple(conv.persona[model_speaker]), tuple(conv.persona[other]) or None, turns, str(path))
