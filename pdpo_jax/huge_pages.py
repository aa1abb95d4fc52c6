"""Transparent huge pages for the host memory XLA allocates on CPU, asked of glibc's malloc.

A CPU step streams through hundreds of MiB: the parameters, a server's KV cache, a train step's
activations. On 4 KiB pages that costs a TLB miss every few KiB. `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
(glibc 2.35 and later) makes malloc mark the large chunks it maps for transparent huge pages
(2 MiB). The kernel's default THP mode, "madvise", honours that mark. `docs/serve.md` has the
decode-step times with and without it.

glibc reads its tunables once, when a process starts. So a `pdpo` command starts itself again, once, with
the tunable added: same process id, same arguments, same environment otherwise. Nothing happens
when the tunable is set already, when `PDPO_HUGE_PAGES=0`, when the kernel's THP is "never" or
absent, or when the C library is not glibc 2.35 or later (macOS, musl).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_ENV = "PDPO_HUGE_PAGES"
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MIN_GLIBC = (2, 35)


def kernel_thp_mode(path: Path = THP_MODE_FILE) -> str | None:
    """The kernel's THP mode (`always`, `madvise` or `never`: the bracketed word), None if unknown."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def tunable_takes_effect(glibc: tuple[int, int] | None, thp_mode: str | None) -> bool:
    """Whether this C library reads the tunable and this kernel gives huge pages for it."""
    return glibc is not None and glibc >= MIN_GLIBC and thp_mode in ("always", "madvise")


def tunables_with_huge_pages(env: Mapping[str, str], glibc: tuple[int, int] | None,
                             thp_mode: str | None) -> str | None:
    """The GLIBC_TUNABLES value to start again with, or None when there is nothing to change."""
    if env.get(OPT_OUT_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return None
    if not tunable_takes_effect(glibc, thp_mode):
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in current:  # set already, by us or by the user: theirs stands
        return None
    return f"{current}:{TUNABLE}" if current else TUNABLE


def restart_with_huge_pages() -> None:
    """Replaces this process with itself plus the tunable (see the module's docstring); returns
    without doing anything when there is nothing to change."""
    tunables = tunables_with_huge_pages(os.environ, glibc_version(), kernel_thp_mode())
    if tunables is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})


def describe() -> str:
    """One line for a benchmark's header: whether this process's large allocations get huge pages."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    mode = kernel_thp_mode()
    on = TUNABLE in tunables.split(":") and tunable_takes_effect(glibc_version(), mode)
    return f"huge pages {'on' if on else 'off'} (GLIBC_TUNABLES={tunables or 'unset'}, kernel THP {mode or 'unknown'})"
