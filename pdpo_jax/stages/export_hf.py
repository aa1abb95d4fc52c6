"""`pdpo export-hf`: a trained model (or any model `load_model` opens) as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

from pdpo_jax.errors import UsageError
from pdpo_jax.model.export import export_hf, parse_size
from pdpo_jax.stages.common import build_mesh, claim_run_dir, config_from_args, stage_parser


def main(argv: list[str]) -> int:
    parser = stage_parser(
        "pdpo export-hf",
        "Write a model as a Hugging Face directory (config.json, safetensors, tokenizer, generation_config.json). "
        "--model takes a training stage's best/ folder, an HF directory or `default`; with --config, the run's "
        "DPO model (<run_dir>/dpo/best) is exported to <run_dir>/export/hf.",
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
        model_path = Path(config.run_dir) / "dpo" / "best"
        out_dir = Path(args.out) if args.out else Path(config.run_dir) / "export" / "hf"
    else:
        if not args.out:
            raise UsageError("--out is required with --model")
        model_path, out_dir = args.model, Path(args.out)
    max_shard_bytes = parse_size(args.max_shard_size)
    if config is None:
        written = export_hf(model_path, out_dir, max_shard_bytes=max_shard_bytes)
    else:
        with claim_run_dir(config):  # the run's mesh: a model too big for one device exports too
            written = export_hf(model_path, out_dir, max_shard_bytes=max_shard_bytes, mesh=build_mesh(config))
    print(f"export-hf: {model_path} -> {written}")
    return 0
