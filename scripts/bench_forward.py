"""Forward throughput of our jitted decoder against PyTorch transformers on the same HF directory.

    python scripts/bench_forward.py [--model DIR] [--batch 8] [--length 256] [--iters 3]

Both run fp32 on the same random full-length batch and produce full logits. Prints tokens/s of
each, our compile time, the ratio (ours / PyTorch) and the largest logit difference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdpo_jax.huge_pages import describe as huge_pages_setting, restart_with_huge_pages  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face model directory (default: the bundled default model)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    return parser.parse_args(argv)


def time_calls(fn, iters: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np
    import torch
    import transformers

    from pdpo_jax.model import Decoder, load_hf

    if args.model is None:
        from pdpo_jax.model.default_model import default_model_dir

        args.model = str(default_model_dir())
    if args.threads:
        torch.set_num_threads(args.threads)
    config, params = load_hf(args.model)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (args.batch, args.length)).astype(np.int32)
    positions = np.broadcast_to(np.arange(args.length, dtype=np.int32), ids.shape).copy()
    segments = np.ones_like(ids)
    tokens = args.batch * args.length

    forward = jax.jit(lambda p, i, pos, seg: Decoder(config).apply({"params": p}, i, pos, seg)[0])
    start = time.perf_counter()
    compiled = forward.lower(params, ids, positions, segments).compile()
    compile_s = time.perf_counter() - start
    ours_s = time_calls(lambda: compiled(params, ids, positions, segments).block_until_ready(), args.iters)

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    torch_ids = torch.as_tensor(ids, dtype=torch.long)
    mask = torch.ones_like(torch_ids)

    def torch_forward():
        with torch.inference_mode():
            return model(input_ids=torch_ids, attention_mask=mask).logits

    torch_s = time_calls(torch_forward, args.iters)
    diff = float(np.abs(np.asarray(compiled(params, ids, positions, segments)) - torch_forward().numpy()).max())

    print(f"model: {args.model} ({config.model_type}, {config.num_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size})")
    print(f"batch {args.batch} x {args.length} fp32, {args.iters} timed iterations, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"{huge_pages_setting()}")
    print(f"jax compile:   {compile_s:8.2f} s")
    print(f"jax forward:   {tokens / ours_s:10.1f} tokens/s ({ours_s * 1000:.1f} ms/batch)")
    print(f"torch forward: {tokens / torch_s:10.1f} tokens/s ({torch_s * 1000:.1f} ms/batch)")
    print(f"ratio jax/torch: {torch_s / ours_s:.2f}x    max |logit diff|: {diff:.2e}")
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()  # ours and the peer alike: both run in this process or its children
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
