"""The one error type for bad input files: it names the file and the line (or row) at fault."""

from __future__ import annotations

from pathlib import Path
from pdpo_jax.errors import PdpoError


class DataError(PdpoError):
    """Input data that cannot be read as documented; `path` and `line` say where (line may be None)."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}")
