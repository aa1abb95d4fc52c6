"""What every `pdpo <stage> --config FILE` command shares: argument parsing, the run directory,
the mesh, and loading a model with the run's compute settings."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pdpo_jax.atomic import atomic_write_text
from pdpo_jax.config import RunConfig, dump_config, load_config


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog="Overrides are dotted keys of the config with YAML values, e.g. sft.epochs=2 "
               "model.path=default data.train=[a.txt,b.txt]. Several --config files merge in order.",
    )
    parser.add_argument("--config", action="append", required=True, metavar="FILE",
                        help="YAML run config (repeatable: later files override earlier ones)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def parse_stage_args(argv: list[str], prog: str, description: str) -> RunConfig:
    args = stage_parser(prog, description).parse_args(argv)
    return load_config(args.config, args.overrides)


def stage_dir(config: RunConfig, name: str) -> Path:
    return Path(config.run_dir) / name


def write_resolved_config(config: RunConfig) -> Path:
    """The run directory keeps the config it was run with (every stage rewrites the same text)."""
    return atomic_write_text(Path(config.run_dir) / "config.yaml", dump_config(config))


def build_mesh(config: RunConfig):
    from pdpo_jax.parallel import initialize_distributed, make_mesh

    initialize_distributed()
    return make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def load_for_run(path: str | Path, config: RunConfig, mesh: Any):
    """`load_model` with the run's compute dtype and rematerialization applied to the model config."""
    from pdpo_jax.model import load_model

    model = load_model(path, mesh=mesh, allow_pickle=config.model.allow_pickle)
    model.config = model.config.replace(dtype=config.model.dtype, remat=config.model.remat)
    if model.tokenizer is None:
        raise ValueError(f"{path}: no tokenizer files next to the model; training and sampling need one")
    return model


def check_batch_fits_mesh(rows: int, config: RunConfig, what: str) -> None:
    """Each micro-batch's rows are split over the data-parallel axes and over the hosts."""
    import jax

    split = max(config.mesh.data, 1) * config.mesh.fsdp
    if config.mesh.data == -1:
        split = jax.device_count() // (config.mesh.fsdp * config.mesh.tensor)
    hosts = jax.process_count()
    if rows % split or rows % hosts:
        raise ValueError(
            f"{what} = {rows} rows per micro-batch cannot be split over data x fsdp = {split} devices and "
            f"{hosts} host(s); choose a batch size that is a multiple of both, or move devices to mesh.tensor"
        )


def start_training_stage(config: RunConfig, name: str, batch_size: int):
    """The stage folder and the mesh of a training stage, or None when its DONE marker says it
    already finished; a stage that runs writes the resolved config first."""
    from pdpo_jax.atomic import is_done

    out_dir = stage_dir(config, name)
    if is_done(out_dir):
        print(f"{name}: already finished in {out_dir} (delete its DONE file to rerun)")
        return None
    write_resolved_config(config)
    mesh = build_mesh(config)
    check_batch_fits_mesh(batch_size, config, f"{name}.batch_size")
    return out_dir, mesh
