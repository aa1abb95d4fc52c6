"""The `pdpo` command: finds the stage's declaration (`pdpo_jax.stages.STAGES`), runs it, and turns
what goes wrong into one line.

Every error a user can cause (a bad config, data file, model directory or flag) reaches the user
as one line `pdpo <stage>: <message>` on stderr with exit status 2; a run that stopped on its own
(a diverged step, a failed download) exits with 1 after its message and what to do next.
`--debug` anywhere on the command line, or PDPO_DEBUG=1, shows the traceback instead. Stage modules are imported only when run, so
`pdpo --help` stays fast and a stage's heavy imports are paid only by the stage that needs them.
Before a stage runs, the command starts itself again once with glibc's huge-page tunable
(`pdpo_jax.huge_pages`; PDPO_HUGE_PAGES=0 turns that off).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from collections.abc import Mapping

from pdpo_jax.errors import PdpoError, RunFailed
from pdpo_jax.huge_pages import restart_with_huge_pages
from pdpo_jax.object_store import is_store_failure, store_error
from pdpo_jax.stages import STAGES

DEBUG_FLAG = "--debug"
DEBUG_ENV = "PDPO_DEBUG"


def platforms_without_absent_tpus(env: Mapping[str, str], tpu_device_files: list[str],
                                  gpu_plugins: list[str] | None = None) -> str | None:
    """The JAX_PLATFORMS a command should run with, or None to leave JAX to choose.

    The set-up installs libtpu (the compiler `pdpo plan` uses), and where libtpu is installed JAX
    tries to start a TPU even on a machine without one: it asks the cloud metadata server and
    warns at length before falling back. Unless JAX_PLATFORMS is set, a machine with no TPU chips
    (no /dev/accel* or /dev/vfio/N device files) runs on its CUDA or ROCm plugin if one is
    installed, else on CPU; a plugin of another kind leaves the choice to JAX.
    """
    if env.get("JAX_PLATFORMS") or tpu_device_files or importlib.util.find_spec("libtpu") is None:
        return None
    platforms = []
    for plugin in _installed_jax_plugins() if gpu_plugins is None else gpu_plugins:
        kind = next((kind for kind in ("cuda", "rocm") if kind in plugin.lower()), None)
        if kind is None:
            return None
        platforms.append(kind)
    return ",".join(dict.fromkeys([*platforms, "cpu"]))


def _installed_jax_plugins() -> list[str]:
    """Names of the PJRT plugins JAX would load: `jax_plugins` entry points and namespace modules."""
    import importlib.metadata
    import pkgutil

    names = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
    try:
        import jax_plugins

        names += [module.name for module in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    return names


def _tpu_device_files() -> list[str]:
    return glob.glob("/dev/accel*") + glob.glob("/dev/vfio/[0-9]*")


def _usage() -> str:
    width = max(len(name) for name in STAGES)
    lines = ["usage: pdpo [--debug] <stage> [--help] [options]", "", "stages:"]
    lines += [f"  {name:<{width}}  {stage.description}" for name, stage in STAGES.items()]
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
    as_command = argv is None  # not called from Python, which must not have its process replaced
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
    if as_command:
        restart_with_huge_pages()  # before anything allocates: glibc reads its tunables at start
    platforms = platforms_without_absent_tpus(os.environ, _tpu_device_files())
    if platforms is not None:  # before any stage imports JAX
        os.environ["JAX_PLATFORMS"] = platforms
    try:
        return STAGES[stage].main(rest)
    except KeyboardInterrupt:
        print(f"pdpo {stage}: interrupted; finished work is on disk and a rerun resumes", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place where errors become messages
        if debug:
            raise
        if is_store_failure(err):  # a Cloud Storage failure no reader named a path for: still one line
            err = store_error(err)
        print(f"pdpo {stage}: {_message(err)}", file=sys.stderr)
        if isinstance(getattr(err, "exit_status", None), int):  # e.g. 75: preempted, rerun to resume
            return err.exit_status
        return 1 if isinstance(err, RunFailed) or not isinstance(err, (ValueError, OSError)) else 2


if __name__ == "__main__":
    sys.exit(main())
