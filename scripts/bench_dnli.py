"""DNLI scoring throughput: our shared-prompt scorer against naive per-candidate scoring in PyTorch.

    python scripts/bench_dnli.py [--model DIR|default] [--data FILE] [--examples 20] [--template chat-en]

Same model, same examples (the first N of the file, protocol 31), same machine, one run, fp32.

* ours: `pdpo_jax.evaluate.dnli` — one row per example, the prompt once and each candidate as a
  branch, `--batch-examples` rows per jitted call. Compilation (one call per distinct padded
  length) is timed apart from scoring.
* PyTorch transformers: per example, a batch of every candidate as its own full sequence
  `prompt + candidate` (left-padded, positions from the mask), logits kept only for the candidate
  positions, log-softmax and the sum of the candidate tokens' log-probs. Torch uses one thread per
  core. One example is run first as a warm-up.

Prints candidates/s of each, the ratio, and how closely the two agree (argmax, largest |Δ log p|).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdpo_jax.huge_pages import describe as huge_pages_setting, restart_with_huge_pages  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dnli" / "valid_havenot.jsonl"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="Hugging Face model directory, or 'default' (the bundled model)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="DNLI .jsonl file")
    parser.add_argument("--examples", type=int, default=20, help="score the first N examples")
    parser.add_argument("--template", default="chat-en")
    parser.add_argument("--batch-examples", type=int, default=4, help="rows per jitted call (ours)")
    parser.add_argument("--bucket", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    return parser.parse_args(argv)


def torch_scores(model, encoded) -> list:
    """Summed candidate log-probs of one example, every candidate a full sequence of one batch."""
    import torch

    prompt = list(encoded.prompt_ids)
    sequences = [prompt + list(c) for c in encoded.candidate_ids]
    width = max(map(len, sequences))
    keep = max(map(len, encoded.candidate_ids))
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep + 1).logits
        logps = torch.log_softmax(logits.float(), dim=-1)  # [candidates, keep + 1, vocab]; last column predicts nothing
    totals = []
    for row, candidate in enumerate(encoded.candidate_ids):
        n = len(candidate)
        predicting = logps[row, keep - n : keep]  # logits at the n positions before each candidate token
        totals.append(float(predicting.gather(-1, torch.tensor(candidate).unsqueeze(-1)).sum()))
    return totals


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np
    import torch
    import transformers

    from pdpo_jax.data import PromptEncoder, read_dnli
    from pdpo_jax.data.batching import bucketed_length
    from pdpo_jax.evaluate import dnli
    from pdpo_jax.model import load_model
    from pdpo_jax.scoring import make_scorer

    loaded = load_model(args.model)
    encoder = PromptEncoder(loaded.tokenizer, args.template)
    examples = read_dnli(args.data, "31")[: args.examples]
    encoded = [dnli.encode_example(e, Path(args.data).stem, encoder) for e in examples]
    candidates = sum(len(e.candidate_ids) for e in encoded)
    per_row = max(len(e.candidate_ids) for e in encoded)
    scorer = make_scorer(loaded, args.batch_examples * per_row)

    groups = dnli.plan_batches([e.row_length for e in encoded], args.batch_examples)
    first_of_each_length = {}
    for group in groups:
        length = bucketed_length(max(encoded[i].row_length for i in group), args.bucket)
        first_of_each_length.setdefault(length, [encoded[i] for i in group])
    start = time.perf_counter()
    for members in first_of_each_length.values():
        scorer(dnli.dnli_batch(members, args.batch_examples, args.bucket))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = dnli.score_examples(encoded, scorer, args.batch_examples, args.bucket, per_row)
    ours_s = time.perf_counter() - start

    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(loaded.path), dtype=torch.float32).eval()
    torch_scores(model, encoded[0])  # warm-up
    start = time.perf_counter()
    reference = [torch_scores(model, e) for e in encoded]
    torch_s = time.perf_counter() - start

    agree = sum(int(np.argmax(s.logps)) == int(np.argmax(r)) for s, r in zip(ours, reference))
    diff = max(float(np.max(np.abs(s.logps - np.array(r)))) for s, r in zip(ours, reference))
    rows = [e.row_length for e in encoded]
    naive_tokens = sum(len(e.prompt_ids) * len(e.candidate_ids) + sum(map(len, e.candidate_ids)) for e in encoded)
    print(f"model: {loaded.path} ({loaded.config.model_type}, {loaded.config.num_layers} layers, hidden {loaded.config.hidden_size})")
    print(f"data: {args.data}, first {len(encoded)} examples, {candidates} candidates, template {args.template}, fp32")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads; {huge_pages_setting()}")
    print(f"tokens per pass: shared-prompt rows {sum(rows)} (mean row {np.mean(rows):.0f}), naive sequences {naive_tokens}")
    print(f"ours:  compile {compile_s:7.2f} s for {len(first_of_each_length)} shapes; scoring {ours_s:7.2f} s "
          f"= {candidates / ours_s:8.2f} candidates/s")
    print(f"torch: scoring {torch_s:7.2f} s = {candidates / torch_s:8.2f} candidates/s")
    print(f"ratio ours/torch: {torch_s / ours_s:.2f}x; argmax agrees on {agree}/{len(encoded)} examples; "
          f"max |delta log p| {diff:.2e}")
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()  # ours and the peer alike: both run in this process or its children
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
