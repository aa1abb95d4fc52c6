"""The base of every error a user can cause and fix: a bad config, data file, model directory or flag.

Each subclass (ConfigError, DataError, PrefsError, ...) carries a message that names the file,
line or field at fault; `pdpo` prints it as one line. They also derive from ValueError, the type
such input errors have in the rest of Python.
"""

from __future__ import annotations

import reprlib
from pathlib import Path


class PdpoError(ValueError):
    """Input the user has to change; the message says where and what."""


class UsageError(PdpoError):
    """A command line that cannot be parsed (unknown flag, missing argument)."""


class DataError(PdpoError):
    """Input data that cannot be read as documented; `path` and `line` say where (line may be None)."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}")


class ModelDirError(PdpoError):
    """A model directory that cannot be loaded: missing, without config.json, weights or tokenizer."""


class RunFailed(RuntimeError):
    """A run that stopped on something other than its input (a diverged step, a failed download);
    what it finished stays on disk and the message says where."""


class InvalidSetting(PdpoError):
    """A settings object that fails its own check when it is built.

    `template` names the object's keys in braces (`"{beta} must be positive, got 0.0"`); the message
    writes each as `<label>.<key>`, and `at(prefix)` writes them under the dotted path where a
    config file put the object (`dpo.beta`, `rl.sampler.top_p`).
    """

    def __init__(self, template: str, label: str):
        self.template = template
        super().__init__(self.at(f"{label}." if label else ""))

    def at(self, prefix: str) -> str:
        return self.template.format_map(_Prefixed(prefix))


class _Prefixed(dict):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def __missing__(self, key: str) -> str:
        return self.prefix + key


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 2
_SHORT_REPR.maxdict = _SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxset = 4
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 60
_SHORT_REPR.maxlong = 40
MAX_SHOWN_CHARS = 80


def shown(value: object) -> str:
    """`repr(value)` cut to a few items per level, two levels and MAX_SHOWN_CHARS characters: a
    message never grows with its input (a config value may hold a million aliased items)."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS - 3] + "..."


def require(ok: bool, template: str, label: str, *, got: object = ...) -> None:
    """Raises `InvalidSetting(template + ", got <got>", label)` unless `ok`."""
    if not ok:
        if got is not ...:
            template += ", got " + shown(got).replace("{", "{{").replace("}", "}}")
        raise InvalidSetting(template, label)
