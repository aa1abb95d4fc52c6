"""PersonaChat / ConvAI2 in ParlAI's FbDialog text format.

Every line is `<index> <text>`; the index restarts at 1 with each dialogue. A dialogue opens with
`your persona: <sentence>` lines (the modelled speaker) and, in the `both` files,
`partner's persona: <sentence>` lines; the original and revised files differ only in wording.
Every later line is `<partner utterance>\t<response>[\t<reward>\t<candidate>|<candidate>...]`:
the model speaks second and columns after the second are ignored. A partner utterance of
`__SILENCE__` on the first turn line means the model opens the conversation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pdpo_jax.data.dialogue import MODEL, PARTNER, Dialogue, Turn, with_swapped
from pdpo_jax.errors import DataError
from pdpo_jax.storage import text_lines

SELF_PERSONA = "your persona:"
PARTNER_PERSONA = "partner's persona:"
SILENCE = "__SILENCE__"
_INDEXED_LINE = re.compile(r"(\d+) (.*)\Z", re.DOTALL)


@dataclass
class _Draft:
    start_line: int
    last_index: int = 1
    persona: list[str] = field(default_factory=list)
    partner_persona: list[str] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)


def read_fbdialog(path: str | Path, both_speakers: bool = False) -> list[Dialogue]:
    """Dialogues of an FbDialog file; with `both_speakers`, each one with a partner persona is
    followed by its swapped view (the partner becomes the model)."""
    dialogues: list[Dialogue] = []
    draft: _Draft | None = None
    for number, line in text_lines(path):
        if not line.strip():
            continue
        match = _INDEXED_LINE.match(line)
        if match is None:
            raise DataError(path, number, "malformed line: expected '<index> <text>'")
        index, text = int(match[1]), match[2]
        if index == 1:
            if draft is not None:
                dialogues.append(_finish(draft, path, len(dialogues)))
            draft = _Draft(start_line=number)
        elif draft is None:
            raise DataError(path, number, f"the first dialogue starts at index {index}, not 1")
        elif index != draft.last_index + 1:
            raise DataError(path, number, f"line index {index} does not follow {draft.last_index}")
        else:
            draft.last_index = index
        _add_line(draft, text, path, number)
    if draft is not None:
        dialogues.append(_finish(draft, path, len(dialogues)))
    return with_swapped(dialogues) if both_speakers else dialogues


def _add_line(draft: _Draft, text: str, path: str | Path, number: int) -> None:
    if "\t" not in text:
        for prefix, sentences in ((SELF_PERSONA, draft.persona), (PARTNER_PERSONA, draft.partner_persona)):
            if text.startswith(prefix):
                if draft.turns:
                    raise DataError(path, number, "persona line after the dialogue's first turn")
                sentence = text[len(prefix):].strip()
                if not sentence:
                    raise DataError(path, number, "empty persona sentence")
                sentences.append(sentence)
                return
        raise DataError(path, number, "missing tab: a turn line needs '<partner utterance>\\t<response>'")
    columns = text.split("\t")
    partner, response = columns[0].strip(), columns[1].strip()
    if not response:
        raise DataError(path, number, "empty response (second column)")
    if not partner:
        raise DataError(path, number, "empty partner utterance (first column)")
    if partner == SILENCE:
        if draft.turns:
            raise DataError(path, number, f"{SILENCE} is only allowed on the first turn line")
    else:
        draft.turns.append(Turn(PARTNER, partner))
    draft.turns.append(Turn(MODEL, response))


def _finish(draft: _Draft, path: str | Path, ordinal: int) -> Dialogue:
    if not draft.persona:
        raise DataError(path, draft.start_line, f"dialogue without '{SELF_PERSONA}' lines")
    if not draft.turns:
        raise DataError(path, draft.start_line, "dialogue without turn lines")
    return Dialogue(
        id=f"{Path(path).stem}:{ordinal}",
        persona=tuple(draft.persona),
        partner_persona=tuple(draft.partner_persona) or None,
        turns=tuple(draft.turns),
        source=str(path),
    )
