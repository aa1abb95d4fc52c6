"""The compiler's figures for one program, kept on disk by what was compiled, so that planning the
same program again reads them instead of compiling it.

Compiling a paper model's train step for a TPU slice takes minutes of CPU, and JAX's persistent
compilation cache cannot serve it: an executable compiled for a compile-only topology cannot be
loaded back without a TPU client. What `pdpo plan` reads of an executable is small (its memory
analysis, its cost analysis, its code size, or the compiler's out-of-memory refusal), so that is
what is kept, one JSON file per program under `$PDPO_CACHE_DIR/plan-analyses` (else
`$XDG_CACHE_HOME/pdpo_jax/plan-analyses`, else `~/.cache/pdpo_jax/plan-analyses`).

The key is everything the compiler saw: the lowered program's text (its shapes, shardings and
mesh), the devices it is compiled for (kind, id and coordinates), and the versions of JAX and
libtpu. Any change to the model, the config or the slice changes the text or the devices, so a
stale entry is never read. `PDPO_PLAN_CACHE=0` turns the store off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax

from pdpo_jax.cache_root import default_cache_root
from pdpo_jax.storage import atomic_write_json

CACHE_SWITCH_ENV = "PDPO_PLAN_CACHE"
FORMAT = 1  # bump when the fields kept change


@dataclass(frozen=True)
class Analysis:
    """What a compile says of a program; `memory` is None when the compiler refused it for its memory."""

    memory: dict[str, int] | None  # a `Memory` as a dict: argument, output, alias, temp bytes per chip
    cost: dict[str, float] | None  # a `Cost` as a dict: flops and bytes accessed per execution
    code_bytes: int
    compile_seconds: float  # of the compile that produced these figures
    refusal: str = ""
    kept: bool = False  # read from the store, not compiled now (not itself stored)


def analyses_dir() -> Path:
    return default_cache_root() / "plan-analyses"


def enabled() -> bool:
    return os.environ.get(CACHE_SWITCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def analysis_key(lowered: Any, args: tuple) -> str:
    """A digest of the lowered program, the devices its arguments are placed on, and the compiler versions."""
    devices: dict[int, str] = {}
    for leaf in jax.tree.leaves(args):
        sharding = getattr(leaf, "sharding", None)
        for device in getattr(sharding, "device_set", ()):
            devices[device.id] = f"{device.device_kind} {device.id} {getattr(device, 'coords', '')}"
    digest = hashlib.sha256()
    for part in (f"format {FORMAT}", f"jax {jax.__version__}", f"jaxlib {_version('jaxlib')}",
                 f"libtpu {_version('libtpu')}", *(devices[i] for i in sorted(devices)), lowered.as_text()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def load(key: str) -> Analysis | None:
    """The kept analysis for `key`, or None (none kept, the store off, or an unreadable file)."""
    if not enabled():
        return None
    try:
        fields = json.loads((analyses_dir() / f"{key}.json").read_text(encoding="utf-8"))
        return Analysis(**fields, kept=True)
    except (OSError, ValueError, TypeError):
        return None


def save(key: str, analysis: Analysis) -> None:
    if enabled():
        fields = asdict(analysis)
        del fields["kept"]
        atomic_write_json(analyses_dir() / f"{key}.json", fields)
