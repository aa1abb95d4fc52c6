"""`pdpo export-hf`: any model `load_model` opens (a training stage's `best/`, an HF directory,
`default`) written as a Hugging Face directory that `AutoModelForCausalLM.from_pretrained` loads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pdpo_jax.model.checkpoint import save_hf
from pdpo_jax.model.loader import load_model

GENERATION_CONFIG = "generation_config.json"


def parse_size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "B": 1}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def export_hf(model_path: str | Path, out_dir: str | Path, *, max_shard_bytes: int = 2 * 1024**3) -> Path:
    model = load_model(model_path)
    source_generation = Path(model.path) / GENERATION_CONFIG
    generation = json.loads(source_generation.read_text()) if source_generation.is_file() else None
    return save_hf(out_dir, model.config.replace(dtype="float32", remat=False), model.params,
                   tokenizer=model.tokenizer, max_shard_bytes=max_shard_bytes, generation_config=generation)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pdpo export-hf",
        description="Write a model as a Hugging Face directory (config.json, safetensors, tokenizer, "
                    "generation_config.json). --model takes a training stage's best/ folder, an HF "
                    "directory or `default`; with --config, the run's DPO model is exported.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model to export")
    source.add_argument("--config", action="append", metavar="FILE",
                        help="run config: exports <run_dir>/dpo/best to <run_dir>/export/hf")
    parser.add_argument("--out", help="output directory (required with --model)")
    parser.add_argument("--max-shard-size", default="2GB", help="split safetensors above this size (default 2GB)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (with --config)")
    args = parser.parse_args(argv)
    if args.config:
        from pdpo_jax.config import load_config

        config = load_config(args.config, args.overrides)
        model_path = Path(config.run_dir) / "dpo" / "best"
        out_dir = Path(args.out) if args.out else Path(config.run_dir) / "export" / "hf"
    else:
        if not args.out:
            parser.error("--out is required with --model")
        model_path, out_dir = args.model, Path(args.out)
    written = export_hf(model_path, out_dir, max_shard_bytes=parse_size(args.max_shard_size))
    print(f"export-hf: {model_path} -> {written}")
    return 0
