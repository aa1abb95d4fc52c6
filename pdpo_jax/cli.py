"""The `pdpo` command: finds the stage, runs its `main`, and turns what goes wrong into one line.

Every error a user can cause (a bad config, data file, model directory or flag) reaches the user
as one line `pdpo <stage>: <message>` on stderr with exit status 2; a run that stopped on its own
(a diverged step, a failed download) exits with 1 after its message and what to do next.
`--debug` anywhere on the command line, or PDPO_DEBUG=1, shows the traceback instead. Stage modules are imported only when run, so
`pdpo --help` stays fast and a stage's heavy imports are paid only by the stage that needs them.
"""

from __future__ import annotations

import importlib
import os
import sys

from pdpo_jax.errors import PdpoError, RunFailed
from pdpo_jax.stages import STAGES

DEBUG_FLAG = "--debug"
DEBUG_ENV = "PDPO_DEBUG"


def _usage() -> str:
    width = max(len(name) for name in STAGES)
    lines = ["usage: pdpo [--debug] <stage> [--help] [options]", "", "stages:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in STAGES.items()]
    lines += ["", "Run `pdpo <stage> --help` for what a stage needs; --debug (or PDPO_DEBUG=1) shows tracebacks."]
    return "\n".join(lines)


def _message(err: BaseException) -> str:
    if isinstance(err, RunFailed):  # what stopped a run may come with instructions over several lines
        return str(err).strip() or type(err).__name__
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, PdpoError):
        return text
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    if isinstance(err, (ValueError, OSError)):
        return text
    return f"internal error: {type(err).__name__}: {text} (run with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"pdpo: unknown stage {stage!r}; run `pdpo --help` for the list", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(STAGES[stage][0])
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        print(f"pdpo {stage}: interrupted; finished work is on disk and a rerun resumes", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place where errors become messages
        if debug:
            raise
        print(f"pdpo {stage}: {_message(err)}", file=sys.stderr)
        return 1 if isinstance(err, RunFailed) or not isinstance(err, (ValueError, OSError)) else 2


if __name__ == "__main__":
    sys.exit(main())
