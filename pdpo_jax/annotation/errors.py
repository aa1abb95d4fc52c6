"""The error of a human study's input: a file, flag or request the user has to change."""

from __future__ import annotations

from pdpo_jax.errors import PdpoError


class StudyError(PdpoError):
    """A study that cannot be built, opened or reported on; the message names the file, line or field."""


class StudyUnavailable(StudyError):
    """The study database went missing or unreadable while the study is served: every request answers
    503 until it is back in place."""
