"""The base of every error a user can cause and fix: a bad config, data file, model directory or flag.

Each subclass (ConfigError, DataError, PrefsError, ...) carries a message that names the file,
line or field at fault; `pdpo` prints it as one line. They also derive from ValueError, the type
such input errors have in the rest of Python.
"""

from __future__ import annotations

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


def require(ok: bool, template: str, label: str, *, got: object = ...) -> None:
    """Raises `InvalidSetting(template + ", got <got>", label)` unless `ok`."""
    if not ok:
        if got is not ...:
            template += ", got " + repr(got).replace("{", "{{").replace("}", "}}")
        raise InvalidSetting(template, label)
