"""Where pdpo_jax keeps its caches on this machine (the bundled model's conversion, copies of
gs:// files, plan analyses): `$PDPO_CACHE_DIR`, else `$XDG_CACHE_HOME/pdpo_jax`, else
`~/.cache/pdpo_jax`."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "PDPO_CACHE_DIR"


def default_cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pdpo_jax"
