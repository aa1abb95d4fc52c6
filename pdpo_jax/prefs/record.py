"""One pseudo-preference record: the typed form of a line that `make-prefs` writes and DPO reads.

    record = PreferenceRecord.from_json_line(line, where="train/shard-00000.jsonl:3")
    record.persona, record.history, record.chosen, record.rejected, record.ref_chosen_logp (None if unscored)
    line == record.to_json_line()        # the bytes a shard holds, key order included

Every field is declared once below with the check its JSON value must pass; a bad record raises
PrefsError naming `where` (file:line) and the field. docs/prefs.md describes every field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pdpo_jax.errors import PdpoError

SPLITS = ("train", "val")
DEGENERATE_REASONS = ("empty", "same_as_chosen", "truncated")
LOGP_SLACK = 1e-3  # a sum of log-probs is <= 0; allow float rounding above it


class PrefsError(PdpoError):
    """Preference records that cannot be made or read as asked; the message names the file."""


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_positive_count(v: Any) -> bool:
    return _is_count(v) and v > 0


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_split(v: Any) -> bool:
    return v in SPLITS


def _is_digest(v: Any) -> bool:
    return isinstance(v, str) and v.startswith("sha256:")


def _is_sampler(v: Any) -> bool:
    return isinstance(v, dict) and isinstance(v.get("kind"), str)


def _is_logp(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= LOGP_SLACK


def _is_logp_or_null(v: Any) -> bool:
    return v is None or _is_logp(v)


def _is_reasons(v: Any) -> bool:
    return isinstance(v, list) and all(r in DEGENERATE_REASONS for r in v)


def _checked(check: Callable[[Any], bool]) -> Any:
    """A record field whose JSON value must pass `check`."""
    return field(metadata={"check": check})


@dataclass(frozen=True)
class PreferenceRecord:
    """A pair (prompt = persona + history, chosen, rejected) with where its negative came from and
    the reference's log-probs of both responses. Fields are in the order of the JSON line; lists of
    the JSON form are tuples here."""

    example_id: str = _checked(_is_str)  # `<dialogue>#<turn>`
    dialogue_id: str = _checked(_is_str)
    donor_dialogue_id: str = _checked(_is_str)  # whose persona the negative was sampled under
    split: str = _checked(_is_split)
    persona: tuple[str, ...] = _checked(_is_str_list)  # the pair's prompt: own persona ...
    donor_persona: tuple[str, ...] = _checked(_is_str_list)
    history: tuple[str, ...] = _checked(_is_str_list)  # ... and the history as scored, oldest first
    history_turns_dropped: int = _checked(_is_count)
    chosen: str = _checked(_is_str)
    rejected: str = _checked(_is_str)
    shuffled: bool = _checked(_is_bool)
    generator: str = _checked(_is_str)
    generator_digest: str = _checked(_is_digest)
    reference: str = _checked(_is_str)
    reference_digest: str = _checked(_is_digest)
    sampler: Mapping[str, Any] = _checked(_is_sampler)
    max_new_tokens: int = _checked(_is_count)
    sample_seed: int = _checked(_is_count)
    sample_row: int = _checked(_is_count)
    # null in both when the folder was made for an objective that needs no reference (SimPO, ORPO)
    ref_chosen_logp: float | None = _checked(_is_logp_or_null)
    ref_rejected_logp: float | None = _checked(_is_logp_or_null)
    chosen_tokens: int = _checked(_is_positive_count)
    rejected_tokens: int = _checked(_is_positive_count)
    degenerate: tuple[str, ...] = _checked(_is_reasons)  # why the negative teaches nothing, if it does not
    dropped: bool = _checked(_is_bool)  # degenerate under prefs.drop_degenerate: readers leave it out

    def to_json(self) -> dict[str, Any]:
        """The JSON object, keys in field order (tuples as lists)."""
        return {name: _json_value(getattr(self, name)) for name in FIELD_NAMES}

    def to_json_line(self) -> str:
        """The record as one shard line, without the newline."""
        return json.dumps(self.to_json(), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> PreferenceRecord:
        """The record of a JSON object; raises PrefsError naming `where` and the first bad field."""
        if not isinstance(obj, dict):
            raise PrefsError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
        missing = [name for name in FIELD_NAMES if name not in obj]
        if missing:
            raise PrefsError(f"{where}: record lacks field(s) {missing}")
        unknown = sorted(set(obj) - set(FIELD_NAMES))
        if unknown:
            raise PrefsError(f"{where}: unknown field(s) {unknown}")
        for name, check in FIELD_CHECKS.items():
            if not check(obj[name]):
                raise PrefsError(f"{where}: field {name!r} has an invalid value {obj[name]!r}")
        if obj["dropped"] and not obj["degenerate"]:
            raise PrefsError(f"{where}: record is marked dropped but not degenerate")
        if (obj["ref_chosen_logp"] is None) != (obj["ref_rejected_logp"] is None):
            raise PrefsError(f"{where}: fields 'ref_chosen_logp' and 'ref_rejected_logp' must both be numbers "
                             "or both null")
        return cls(**{name: tuple(value) if isinstance(value, list) else value for name, value in obj.items()})

    @classmethod
    def from_json_line(cls, line: str, where: str) -> PreferenceRecord:
        """The record of one shard line; raises PrefsError naming `where` when it is not one."""
        if not line.strip():
            raise PrefsError(f"{where}: empty line")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise PrefsError(f"{where}: not valid JSON ({err.msg})") from None
        return cls.from_json(obj, where)


def _json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


FIELD_CHECKS: dict[str, Callable[[Any], bool]] = {f.name: f.metadata["check"] for f in dataclasses.fields(PreferenceRecord)}
FIELD_NAMES = tuple(FIELD_CHECKS)
