"""`pdpo export-hf`: a trained model (or any model `load_model` opens) as a Hugging Face directory.

In a pipeline, the export-hf step writes the run's DPO model to `<run_dir>/export/hf`
(`export_run_model`).
"""

from __future__ import annotations

from typing import Any

from pdpo_jax.config import RunConfig
from pdpo_jax.errors import UsageError
from pdpo_jax.model.export import export_hf, parse_size
from pdpo_jax.object_store import as_path
from pdpo_jax.run_layout import RunLayout
from pdpo_jax.stage_runner import build_mesh, claim_run_dir, config_from_args, run_once, stage_parser


def export_run_model(config: RunConfig) -> dict[str, Any]:
    """The run's DPO model as a Hugging Face directory: loaded onto the run's mesh, gathered onto
    process 0 one tensor at a time, written by it alone."""
    layout = RunLayout.of(config)
    hf_dir = {"hf_dir": str(layout.exported_model)}

    def export(mesh: Any) -> dict[str, Any]:
        export_hf(layout.trained_model(config, "dpo"), layout.exported_model, mesh=mesh)
        return hf_dir

    return run_once(config, "export-hf", layout.export, export, when_finished=lambda _: hf_dir)


def main(argv: list[str]) -> int:
    parser = stage_parser(
        "pdpo export-hf",
        "Write a model as a Hugging Face directory (config.json, safetensors, tokenizer, generation_config.json). "
        "--model takes a training stage's best/ folder, an HF directory or `default`; with --config, the run's "
        "DPO model (<run_dir>/dpo/best; the last round's with dpo.rounds > 1) is exported to <run_dir>/export/hf.",
        config="optional",
    )
    parser.add_argument("--model", help="model to export (instead of --config)")
    parser.add_argument("--out", help="output directory (required with --model)")
    parser.add_argument("--max-shard-size", default="2GB", help="split safetensors above this size (default 2GB)")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    if (config is None) == (args.model is None):
        raise UsageError("give either --model or --config (see pdpo export-hf --help)")
    if config is not None:
        layout = RunLayout.of(config)
        model_path = layout.trained_model(config, "dpo")
        out_dir = as_path(args.out) if args.out else layout.exported_model
    else:
        if not args.out:
            raise UsageError("--out is required with --model")
        model_path, out_dir = args.model, as_path(args.out)
    max_shard_bytes = parse_size(args.max_shard_size)
    if config is None:
        written = export_hf(model_path, out_dir, max_shard_bytes=max_shard_bytes)
    else:
        with claim_run_dir(config):  # the run's mesh: a model too big for one device exports too
            written = export_hf(model_path, out_dir, max_shard_bytes=max_shard_bytes, mesh=build_mesh(config))
    print(f"export-hf: {model_path} -> {written}")
    return 0
