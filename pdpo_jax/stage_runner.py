"""What every stage shares, so that a stage module is only the glue between its config section and
the library it calls: the argument parser, the run config, the run directory's lock, the mesh,
loading a model with the run's compute settings, and `run_once`, the sequence every stage that
writes a folder of the run goes through:

    DONE check -> mesh -> resolved config -> the stage's work -> DONE -> one line of result

`run_command` is `pdpo <stage>` for a stage declared with `arguments="config"`: it parses
`--config FILE ... KEY=VALUE`, holds the run directory's lock and calls the stage's `run`.

This module is not a stage; the stages' declarations are in `pdpo_jax.stages`. Stages raise
errors instead of printing them; `pdpo_jax.cli` turns each into one line.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax

from pdpo_jax.config import ConfigError, RunConfig, dump_config, load_config
from pdpo_jax.errors import UsageError
from pdpo_jax.storage import atomic_write_text, is_done, mark_done
from pdpo_jax.model import Model, load_model, require_tokenizer
from pdpo_jax.object_store import check_bucket
from pdpo_jax.parallel import agree, barrier, initialize_distributed, is_primary, make_mesh, primary_decides
from pdpo_jax.run_layout import RunLayout
from pdpo_jax.run_lock import run_dir_lock

OVERRIDES_HELP = ("Overrides are dotted keys of the config with YAML values, e.g. sft.epochs=2 "
                  "model.path=default data.train=[a.txt,b.txt]. Several --config files merge in order.")


class StageParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised (as UsageError), not printed with the usage text."""

    def error(self, message: str):  # noqa: D401 - argparse's name
        raise UsageError(f"{message} (see {self.prog} --help)")


def stage_parser(prog: str, description: str, *, config: str = "required", **kwargs: Any) -> StageParser:
    """The parser of one stage. `config`: "required" or "optional" adds the one convention every
    stage follows, `--config FILE` (repeatable) plus `KEY=VALUE` overrides; "none" adds neither."""
    parser = StageParser(prog=prog, description=description, epilog=kwargs.pop("epilog", OVERRIDES_HELP), **kwargs)
    if config != "none":
        parser.add_argument("--config", action="append", required=config == "required", metavar="FILE",
                            help="YAML run config (repeatable: later files override earlier ones)")
        parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig | None:
    """The run config the parsed `--config` files and overrides describe (None without --config)."""
    if not args.config:
        if args.overrides:
            raise UsageError(f"key=value overrides need --config: {args.overrides}")
        return None
    return load_config(args.config, args.overrides)


def parse_stage_args(argv: list[str], prog: str, description: str) -> RunConfig:
    return config_from_args(stage_parser(prog, description).parse_args(argv))


def write_resolved_config(config: RunConfig) -> Path:
    """The run directory keeps the config it was run with (every stage rewrites the same text;
    on a pod, process 0 does)."""
    path = RunLayout.of(config).config
    if is_primary():
        atomic_write_text(path, dump_config(config))
    return path


@contextlib.contextmanager
def claim_run_dir(config: RunConfig) -> Iterator[None]:
    """The run directory for this command alone while the block runs: process 0 holds its lock
    (`pdpo_jax.run_lock`), and when another command holds it every process stops with that
    message. Joins a multi-host run first (which must precede any other JAX call). A gs:// run
    directory's bucket is checked first, so a missing bucket or credentials fail in one line."""
    initialize_distributed()
    check_bucket(config.run_dir)
    with contextlib.ExitStack() as stack:
        primary_decides(lambda: stack.enter_context(run_dir_lock(config.run_dir)) and None)
        yield


def finished(out_dir: Path) -> bool:
    """Whether a stage folder has its DONE marker, as process 0 sees it (so every host agrees)."""
    return bool(agree(is_done(out_dir)))


def parse_mesh(spec: str) -> dict[str, int] | None:
    """A `--mesh` flag: "data=2,fsdp=2,tensor=1" (omitted axes: data -1, others 1); "none" for no mesh."""
    if spec.strip().lower() == "none":
        return None
    sizes = {"data": -1, "fsdp": 1, "tensor": 1}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        axis, sep, value = part.partition("=")
        if not sep or axis.strip() not in sizes:
            raise UsageError(f"--mesh {spec!r}: expected data=N,fsdp=N,tensor=N (or none)")
        try:
            sizes[axis.strip()] = int(value)
        except ValueError:
            raise UsageError(f"--mesh {spec!r}: {axis.strip()} must be an integer") from None
    return sizes


def build_mesh(config: RunConfig):
    initialize_distributed()
    return make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def model_load_options(config: RunConfig) -> dict[str, Any]:
    """`load_model`'s options from the run config's `model` section: the compute dtype,
    rematerialization, layer layout and whether pickled weights may be read."""
    return {"compute_dtype": config.model.dtype, "remat": config.model.remat,
            "scan_layers": config.model.scan_layers, "allow_pickle": config.model.allow_pickle}


def load_for_run(path: str | Path, config: RunConfig, mesh: Any) -> Model:
    """`load_model` with the run's `model_load_options`; the stages that call it turn text into
    tokens, so the model must come with a tokenizer."""
    model = load_model(path, mesh=mesh, **model_load_options(config))
    require_tokenizer(model)
    return model


def check_batch_fits_mesh(rows: int, config: RunConfig, what: str) -> None:
    """Each micro-batch's rows are split over the data-parallel axes and over the hosts."""
    split = max(config.mesh.data, 1) * config.mesh.fsdp
    if config.mesh.data == -1:
        split = jax.device_count() // (config.mesh.fsdp * config.mesh.tensor)
    hosts = jax.process_count()
    if rows % split or rows % hosts:
        raise ConfigError(
            f"{what} = {rows} rows per micro-batch cannot be split over data x fsdp = {split} devices and "
            f"{hosts} host(s); choose a batch size that is a multiple of both, or move devices to mesh.tensor"
        )


def run_once(config: RunConfig, name: str, folder: Path, work: Callable[[Any], dict[str, Any]], *,
             needs_mesh: bool = True,
             check: Callable[[Any], None] | None = None,
             batch_sizes: Mapping[str, int] | None = None,
             when_finished: Callable[[Path], Any] | None = None,
             done_record: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
             result_line: Callable[[dict[str, Any]], str] | None = None) -> Any:
    """The sequence of a stage that writes `folder` of the run, under the run directory's lock:

    if `folder` has its DONE marker, says so and returns `when_finished(folder)` (default:
    {"stage_dir": folder}); else builds the mesh (None when not `needs_mesh`), runs `check(mesh)`
    (what must hold before the run's config is rewritten, e.g. that a half-built folder was built
    with these settings), writes the resolved config, checks that each of `batch_sizes`
    ({"sft.batch_size": rows}) splits over the mesh, runs `work(mesh)`, writes its summary (or
    `done_record(summary)`) as the DONE marker (process 0), waits for every host, prints
    `result_line(summary)` and returns the summary.
    """
    initialize_distributed()  # joins a multi-host run before anything else touches JAX
    mesh = build_mesh(config) if needs_mesh else None
    if finished(folder):
        print(f"{name}: already finished in {folder} (delete its DONE file to rerun)")
        return when_finished(folder) if when_finished else {"stage_dir": str(folder)}
    if check is not None:
        check(mesh)
    write_resolved_config(config)
    for what, rows in (batch_sizes or {}).items():
        check_batch_fits_mesh(rows, config, what)
    summary = work(mesh)
    if is_primary():
        mark_done(folder, summary if done_record is None else done_record(summary))
    barrier(name)
    if result_line is not None:
        print(result_line(summary))
    return summary


def run_command(prog: str, description: str, run: Callable[[RunConfig], Any], argv: list[str],
                report: Callable[[Any, RunConfig], None] | None = None) -> int:
    """`pdpo <stage> --config FILE ... KEY=VALUE`: the run config, the run directory held while
    `run(config)` works, then `report(result, config)` if the stage prints more than its line."""
    config = parse_stage_args(argv, prog, description)
    with claim_run_dir(config):
        result = run(config)
    if report is not None:
        report(result, config)
    return 0

