"""New tokens/s of our jitted `generate` against PyTorch transformers `generate` on one HF directory.

    python scripts/bench_generate.py [--model DIR] [--batch 32] [--prompt-length 128] [--new-tokens 64]

Both run in the same precision (`--dtype`, fp32 by default) on the same left-padded batch of mixed-length prompts (lengths spread +-25% around
--prompt-length), greedy and then top-p (p=0.9). End-of-sequence is switched off in both, so every
row produces exactly --new-tokens tokens and the two do the same amount of work. Our compile time
is measured by compiling ahead of time; the timed run (prompt alignment, the compiled prefill and
decode loop, and the copy back to numpy) then runs what `generate` runs, without compiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdpo_jax.huge_pages import describe as huge_pages_setting, restart_with_huge_pages  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face model directory (default: the bundled default model)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=128, help="mean prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute precision of both sides (ours: the model's compute dtype; torch: the weights' dtype)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: all cores)")
    parser.add_argument("--skip-torch", action="store_true", help="time only our generate")
    return parser.parse_args(argv)


def prompt_batch(batch: int, mean_length: int, vocab_size: int, pad_id: int, seed: int = 0):
    """Random ids, left-padded; lengths spread over [0.75, 1.25] x mean_length."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(int(mean_length * 0.75), int(mean_length * 1.25) + 1, size=batch)
    width = int(lengths.max())
    mask = (np.arange(width)[None, :] >= (width - lengths)[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(3, vocab_size, size=(batch, width)), pad_id)
    return ids, mask


def without_eos(model):
    """A copy of `model` whose end-of-sequence id is one the model can never emit."""
    return dataclasses.replace(model, config=model.config.replace(eos_token_id=model.config.vocab_size), tokenizer=None)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np
    import torch
    import transformers

    from pdpo_jax.model import load_model
    from pdpo_jax.generation import Greedy, TopP, generate

    if args.model is None:
        from pdpo_jax.model.default_model import default_model_dir

        args.model = str(default_model_dir())
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    model = without_eos(load_model(args.model))
    model = dataclasses.replace(model, config=model.config.replace(dtype=args.dtype))
    pad_id = 0
    ids, mask = prompt_batch(args.batch, args.prompt_length, model.config.vocab_size, pad_id)
    new_tokens = args.batch * args.new_tokens

    torch_model = None
    if not args.skip_torch:
        torch_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch_dtype).eval()
        torch_model.generation_config.eos_token_id = None  # run every row to the full length, like ours
    torch_ids, torch_mask = torch.as_tensor(ids), torch.as_tensor(mask)

    print(f"model: {args.model} ({model.config.model_type}, {model.config.num_layers} layers, "
          f"hidden {model.config.hidden_size}, vocab {model.config.vocab_size})")
    print(f"batch {args.batch}, prompt lengths {int(mask.sum(1).min())}..{int(mask.sum(1).max())} (left-padded), "
          f"{args.new_tokens} new tokens, {args.dtype}; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads; {huge_pages_setting()}")
    for name, sampler, hf_kwargs in (
        ("greedy", Greedy(), dict(do_sample=False)),
        (f"top-p {args.top_p}", TopP(args.top_p), dict(do_sample=True, top_p=args.top_p, top_k=0, temperature=1.0)),
    ):
        def run():
            return generate(model, ids, mask, max_new_tokens=args.new_tokens, sampler=sampler, seed=0)

        _, first_s = timed(run)  # compiles, then runs
        ours, ours_s = timed(run)
        compile_s = first_s - ours_s
        assert ours.shape == (args.batch, args.new_tokens)
        print(f"[{name}] jax compile:    {compile_s:9.2f} s")
        print(f"[{name}] jax generate:   {new_tokens / ours_s:9.1f} new tokens/s ({ours_s:.2f} s)")
        if torch_model is None:
            continue
        torch.manual_seed(0)

        def torch_run():
            with torch.inference_mode():
                return torch_model.generate(input_ids=torch_ids, attention_mask=torch_mask, max_new_tokens=args.new_tokens,
                                            pad_token_id=pad_id, **hf_kwargs)

        with torch.inference_mode():  # warm-up on two rows, so one-off set-up is not timed
            torch_model.generate(input_ids=torch_ids[:2], attention_mask=torch_mask[:2], max_new_tokens=2,
                                 pad_token_id=pad_id, **hf_kwargs)
        theirs, torch_s = timed(torch_run)
        assert theirs.shape == (args.batch, ids.shape[1] + args.new_tokens), theirs.shape
        print(f"[{name}] torch generate: {new_tokens / torch_s:9.1f} new tokens/s ({torch_s:.2f} s)")
        print(f"[{name}] ratio jax/torch: {torch_s / ours_s:.2f}x")
        if name == "greedy":
            same = (theirs[:, ids.shape[1]:].numpy() == ours).mean()
            print(f"[greedy] tokens equal to torch's: {same:.1%}")
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()  # ours and the peer alike: both run in this process or its children
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
