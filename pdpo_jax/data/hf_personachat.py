"""PersonaChat in the Hugging Face layout, read through `datasets`.

Each row is one dialogue: `personality` (the modelled speaker's persona sentences) and `utterances`,
a list of `{"history": [...], "candidates": [...]}` where the last candidate is the gold response to
the history (the layout of `personachat_self_original.json` and of Hub copies such as
AlekseyKorshuk/persona-chat). The last utterance's history plus its gold response is the whole
dialogue; every earlier entry must agree with it. A leading `__ silence __` means the model opens.

Sources: a directory written by `save_to_disk` (a Dataset, or a DatasetDict with `split`), a local
`.json`/`.jsonl` file (a `.json` file holding {"train": [...], "valid": [...]} needs `split`), or a
Hub name (only with network access).
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Iterable
from typing import Any

from pdpo_jax.data.dialogue import MODEL, PARTNER, Dialogue, Turn, with_swapped
from pdpo_jax.errors import DataError
from pdpo_jax.storage import json_lines, parse_json, text_lines

_SILENCE_FORMS = {"__silence__", "__ silence __"}


def read_hf_personachat(
    source: str | Path,
    split: str | None = None,
    both_speakers: bool = False,
    cache_dir: str | Path | None = None,
) -> list[Dialogue]:
    """Dialogues from a saved dataset, a local JSON/JSONL file, or a Hub name.

    `both_speakers` is accepted for a uniform interface; this layout has no partner persona, so
    no swapped views are produced."""
    rows = _load_rows(source, split, cache_dir)
    name = f"{Path(str(source)).stem}" + (f"/{split}" if split else "")
    dialogues = [_dialogue(row, number, source, name) for number, row in enumerate(rows, 1)]
    return with_swapped(dialogues) if both_speakers else dialogues


def _load_rows(source: str | Path, split: str | None, cache_dir: str | Path | None):
    import datasets

    path = Path(source)
    cache = None if cache_dir is None else str(cache_dir)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split is None and len(loaded) == 1:
                split = next(iter(loaded))
            if split not in loaded:
                raise DataError(path, None, f"split {split!r} not found; the dataset has {sorted(loaded)}")
            return loaded[split]
        return loaded
    if path.is_file():
        field = None
        if path.suffix == ".json" and _first_char(path) == "{":
            if split is None:
                raise DataError(path, None, "this file maps split names to dialogues: pass split= (e.g. 'train' or 'valid')")
            field = split
        _check_rows(path, field)  # before `datasets`, which would cache and log a file it cannot use at length
        try:
            return datasets.load_dataset("json", data_files=str(path), field=field, split="train", cache_dir=cache)
        except Exception as err:  # datasets wraps parse errors in several exception types
            raise DataError(path, None, f"cannot be read as PersonaChat JSON: {err}") from err
    return datasets.load_dataset(str(source), split=split or "train", cache_dir=cache)


def _check_rows(path: Path, field: str | None) -> None:
    """DataError naming the line (or dialogue) unless `path` is UTF-8 JSON holding dialogue objects
    with 'personality' and 'utterances': one a line (`.jsonl`), a list, or a list under `field`."""
    if path.suffix.lower() == ".jsonl":
        rows: Iterable[tuple[int | None, Any]] = json_lines(path)
    else:
        value = parse_json("\n".join(line for _, line in text_lines(path)), path)
        if field is not None:
            if not isinstance(value, dict) or field not in value:
                raise DataError(path, None, f"no split {field!r} in this file")
            value = value[field]
        if not isinstance(value, list):
            raise DataError(path, None, f"expected a list of dialogues, found {type(value).__name__}")
        rows = ((None, record) for record in value)
    count = 0
    for number, record in rows:
        count += 1
        if not isinstance(record, dict) or not {"personality", "utterances"} <= set(record):
            raise DataError(path, number, f"dialogue {count}: expected an object with 'personality' and 'utterances'")
    if count == 0:
        raise DataError(path, None, "no dialogues")


def _first_char(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return head[:1]


def _dialogue(row: dict[str, Any], number: int, source: str | Path, name: str) -> Dialogue:
    def fail(message: str) -> DataError:
        return DataError(source, number, f"row {number}: {message}")

    persona = row.get("personality")
    utterances = _as_records(row.get("utterances"))
    if not persona or not all(isinstance(s, str) and s.strip() for s in persona):
        raise fail("dialogue without persona ('personality' is empty or not a list of strings)")
    if not utterances:
        raise fail("'utterances' is empty")
    last = utterances[-1]
    if not last.get("candidates"):
        raise fail("the last utterance has no candidates")
    texts = [text.strip() for text in list(last.get("history") or []) + [last["candidates"][-1]]]
    for position, entry in enumerate(utterances):
        history, candidates = list(entry.get("history") or []), entry.get("candidates") or []
        at = len(history)
        if not candidates or at >= len(texts) or [h.strip() for h in history] != texts[:at] or candidates[-1].strip() != texts[at]:
            raise fail(f"utterances[{position}] does not agree with the full dialogue of the last utterance")
        if (len(texts) - 1 - at) % 2:
            raise fail(f"utterances[{position}] answers a line of the partner's side")
    speakers = [MODEL if (len(texts) - 1 - i) % 2 == 0 else PARTNER for i in range(len(texts))]
    turns = [Turn(s, t) for s, t in zip(speakers, texts)]
    if turns and turns[0].speaker == PARTNER and turns[0].text.lower() in _SILENCE_FORMS:
        turns = turns[1:]
    try:
        return Dialogue(f"{name}:{number - 1}", tuple(s.strip() for s in persona), None, tuple(turns), str(source))
    except ValueError as err:
        raise fail(str(err)) from None


def _as_records(value: Any) -> list[dict[str, Any]]:
    """A list of dicts whether `datasets` returned a list of structs or a struct of lists."""
    if isinstance(value, dict):
        keys = list(value)
        return [dict(zip(keys, items)) for items in zip(*(value[k] for k in keys))]
    return list(value or [])
