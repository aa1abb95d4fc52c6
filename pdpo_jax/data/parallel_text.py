"""PersonaChat in the line-aligned layout of OpenNMT-style dialogue code (e.g. RCDG's release).

Three files side by side describe one split, line i of each the same turn:

    per-val.txt  persona sentences joined by `</s>`, without final periods
    src-val.txt  the partner's utterance
    tgt-val.txt  the model's response

Pass any one of them: the others are found by replacing its leading `per-`, `src-` or `tgt-`.
There is no dialogue boundary marker, so a dialogue is a run of consecutive lines with the same
persona line (two consecutive dialogues sharing a persona become one). Dialogue ids are the persona
file's stem and the run's ordinal, e.g. `per-val:17`, whichever of the three files is passed.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path

from pdpo_jax.data.dialogue import MODEL, PARTNER, Dialogue, Turn, with_swapped
from pdpo_jax.errors import DataError
from pdpo_jax.object_store import as_path
from pdpo_jax.storage import text_lines

ROLES = ("per", "src", "tgt")
PERSONA_SEPARATOR = "</s>"


def parallel_files(path: str | Path) -> dict[str, Path] | None:
    """{"per": ..., "src": ..., "tgt": ...} for a file named `per-*`, `src-*` or `tgt-*`; None otherwise."""
    path = as_path(path)
    role, dash, rest = path.name.partition("-")
    if role not in ROLES or not dash or not rest:
        return None
    return {other: path.with_name(f"{other}-{rest}") for other in ROLES}


def is_parallel_file(path: str | Path) -> bool:
    files = parallel_files(path)
    return files is not None and all(file.is_file() for file in files.values())


def read_parallel_personachat(path: str | Path, both_speakers: bool = False) -> list[Dialogue]:
    """Dialogues of one split. `both_speakers` is accepted for a uniform interface; the layout has no
    partner persona, so no swapped views are produced."""
    files = parallel_files(path)
    if files is None:
        raise DataError(path, None, "not a parallel-layout file: the name must start with 'per-', 'src-' or 'tgt-'")
    for file in files.values():
        if not file.is_file():
            raise DataError(path, None, f"the parallel layout needs {file.name} beside it")
    runs: list[tuple[str, tuple[str, ...], list[Turn]]] = []  # (persona line, persona, turns)
    for number, persona_line, partner, response in _aligned_lines(files):
        if not runs or runs[-1][0] != persona_line:
            runs.append((persona_line, _persona(persona_line, files["per"], number), []))
        runs[-1][2].extend((Turn(PARTNER, partner), Turn(MODEL, response)))
    stem = files["per"].stem
    dialogues = [
        Dialogue(id=f"{stem}:{ordinal}", persona=persona, partner_persona=None, turns=tuple(turns), source=str(files["per"]))
        for ordinal, (_, persona, turns) in enumerate(runs)
    ]
    return with_swapped(dialogues) if both_speakers else dialogues


def _aligned_lines(files: dict[str, Path]) -> Iterator[tuple[int, str, str, str]]:
    """(line number, persona line, partner utterance, response), failing at the first line that one
    file lacks or leaves empty."""
    for rows in zip_longest(*(text_lines(files[role]) for role in ROLES)):
        number = next(row[0] for row in rows if row is not None)
        for role, row in zip(ROLES, rows):
            if row is None:
                longer = next(files[other].name for other, kept in zip(ROLES, rows) if kept is not None)
                raise DataError(files[role], number, f"file ends after {number - 1} lines; {longer} has more")
            if not row[1].strip():
                raise DataError(files[role], number, "empty line")
        yield number, *(row[1].strip() for row in rows)


def _persona(text: str, path: Path, number: int) -> tuple[str, ...]:
    sentences = tuple(sentence.strip() for sentence in text.split(PERSONA_SEPARATOR))
    if not all(sentences):
        raise DataError(path, number, "empty persona sentence")
    # The FbDialog files end every persona sentence in "." with no space before it, even after "!"
    # ("i love cooking !."); this layout dropped exactly that period.
    return tuple(f"{sentence}." for sentence in sentences)

