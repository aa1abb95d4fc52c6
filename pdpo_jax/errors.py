"""The base of every error a user can cause and fix: a bad config, data file, model directory or flag.

Each subclass (ConfigError, DataError, PrefsError, ...) carries a message that names the file,
line or field at fault; `pdpo` prints it as one line. They also derive from ValueError, the type
such input errors have in the rest of Python.
"""

from __future__ import annotations


class PdpoError(ValueError):
    """Input the user has to change; the message says where and what."""


class UsageError(PdpoError):
    """A command line that cannot be parsed (unknown flag, missing argument)."""


class ModelDirError(PdpoError):
    """A model directory that cannot be loaded: missing, without config.json, weights or tokenizer."""


class RunFailed(RuntimeError):
    """A run that stopped on something other than its input (a diverged step, a failed download);
    what it finished stays on disk and the message says where."""
