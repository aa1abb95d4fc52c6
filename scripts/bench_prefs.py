"""Pseudo-preference records/s: our make-prefs stage against the paper stack's equivalent.

    python scripts/bench_prefs.py [--data FILE] [--dialogues 16] [--batch 16] [--new-tokens 32]
                                  [--layout tree|per_turn|both] [--threads N] [--skip-torch]

One run, one machine, one model (default: the bundled SmolLM2-135M-Instruct), fp32, on the first
`--dialogues` dialogues of a staged PersonaChat file (default: the staged train dialogues). Both
sides build a record for every example of the slice from the same plan: the same donor personas
(`persona_derangement`), the same generation prompts (donor persona + the history that leaves room
for `--new-tokens`) and pair prompts (own persona + the history that fits with the longer
response), cut as our compared layout cuts them (`kept_histories`: per turn, or nested for the
tree layout), in the same batches of `--batch` examples, sampling top-p 0.9 at temperature 1 with at
most `--new-tokens` new tokens and stopping at the end of turn.

  ours   `build_shard` of `pdpo_jax.prefs`, the code the stage runs: the jitted sampler and
         the shared scorer, in the configured `prefs.layout` (tree: one prefill per dialogue run of
         a batch and one scored row per run of nesting pairs; per_turn: one row per example).
         A first, untimed pass over the slice compiles every shape the timed pass uses.
  peer   transformers `generate(do_sample=True, top_p=0.9, top_k=0)` on the left-padded batch of
         generation prompts, then the reference log-probs the way TRL precomputes them
         (`precompute_ref_log_probs`): one forward over the batch's right-padded [prompt | chosen]
         and [prompt | rejected] rows, the response tokens' log-probs summed. One warm-up batch
         first.

The last line is `prefs_speedup=W`: our records/s (the tree layout with `--layout both`) over the
peer's. The negatives are each side's own draws, so their lengths (hence the work) differ a little.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdpo_jax.huge_pages import describe as huge_pages_setting, restart_with_huge_pages  # noqa: E402

PARALLEL_TRAIN = Path("data") / "personachat" / "parallel" / "per-train.txt"
# The staged data sits in a `shared/` folder beside the checkout, or beside the folder of checkouts.
DEFAULT_DATA = next((p for p in (Path(__file__).resolve().parents[i] / "shared" / PARALLEL_TRAIN for i in (2, 3))
                     if p.is_file()), Path(__file__).resolve().parents[2] / "shared" / PARALLEL_TRAIN)
TOP_P = 0.9
LAYOUTS = ("tree", "per_turn")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default",
                        help="model directory with tokenizer files (default: the bundled model)")
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="PersonaChat-style dialogue file (default: the staged train dialogues)")
    parser.add_argument("--dialogues", type=int, default=16, help="the first N dialogues of --data")
    parser.add_argument("--batch", type=int, default=16, help="examples per sampling batch (prefs.batch_size)")
    parser.add_argument("--new-tokens", type=int, default=32, help="token budget of a negative (prefs.max_new_tokens)")
    parser.add_argument("--max-length", type=int, default=512, help="data.max_length: prompt + response tokens")
    parser.add_argument("--layout", choices=(*LAYOUTS, "both"), default="tree", help="our prefs.layout")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: all cores)")
    parser.add_argument("--skip-torch", action="store_true", help="time only our stage")
    args = parser.parse_args(argv)
    if args.dialogues < 2 or args.batch < 1 or args.new_tokens < 1:
        parser.error("--dialogues must be at least 2 (personas are swapped between dialogues); --batch and "
                     "--new-tokens at least 1")
    return args


def run_config(args: argparse.Namespace, layout: str):
    from pdpo_jax.config import load_config

    return load_config(None, [
        f"data.max_length={args.max_length}", "data.template=chat-en", "data.on_overflow=skip",
        f"prefs.batch_size={args.batch}", f"prefs.max_new_tokens={args.new_tokens}", f"prefs.layout={layout}",
        "prefs.sampler.kind=top_p", f"prefs.sampler.top_p={TOP_P}", "prefs.sampler.temperature=1.0",
        "prefs.seed=0",
    ])


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# --- ours ----------------------------------------------------------------------------------------------


def ours(args: argparse.Namespace, jobs: list, side, layout: str) -> dict:
    """`build_shard` over the whole slice as shard 0, once to compile and once timed."""
    from pdpo_jax.generation import sampler_from_config
    from pdpo_jax.prefs import build_shard, scorer_for_layout

    config = run_config(args, layout)
    sampler = sampler_from_config("top_p", temperature=1.0, top_p=TOP_P)
    score = scorer_for_layout(config, side)

    def run():
        return build_shard(jobs, "train", 0, config, side, side, score, sampler)

    _, first_s = timed(run)
    records, seconds = timed(run)
    return {"records": len(records), "seconds": seconds, "compile_s": first_s - seconds,
            "rejected_tokens": sum(r.rejected_tokens for r in records)}


# --- the paper stack: transformers generate + TRL-style precomputed reference log-probs --------------


def left_padded(prompts: list[list[int]], pad: int):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def reference_logps(torch_model, rows: list[tuple[list[int], list[int]]], pad: int):
    """TRL's concatenated forward: every (prompt, response) of the batch right-padded in one
    forward, each response's token log-probs summed."""
    import torch

    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(rows):
        ids[row, : len(prompt) + len(response)] = torch.tensor(prompt + response)
        mask[row, : len(prompt) + len(response)] = 1
        scored[row, len(prompt) : len(prompt) + len(response)] = True
    with torch.inference_mode():
        logits = torch_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logps = torch.gather(torch.log_softmax(logits.float(), dim=-1), 2, ids[:, 1:, None])[..., 0]
    return (logps * scored[:, 1:]).sum(-1).tolist()


def peer_batch(args: argparse.Namespace, jobs: list, layout: str, torch_model, model, encoder,
               stop_ids: list[int]) -> int:
    """One batch on the paper stack, with exactly the prompts our stage builds for it in `layout`
    (`kept_histories`); returns the records it made."""
    import torch

    from pdpo_jax.generation import context_limit, cut_at_stop, decode_response, stop_sequences
    from pdpo_jax.prefs import kept_histories

    nested = layout == "tree"
    room = context_limit(model, args.max_length) - args.new_tokens
    kept = kept_histories(jobs, [job.donor_persona for job in jobs], [0] * len(jobs), room, encoder, nested=nested)
    batch = [(job, history) for job, history in zip(jobs, kept) if history is not None]
    if not batch:
        return 0
    pad = int(model.config.pad_token_id or 0)
    ids, mask = left_padded([encoder.prompt_ids(job.donor_persona, history) for job, history in batch], pad)
    with torch.inference_mode():
        out = torch_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=True,
                                   top_p=TOP_P, top_k=0, temperature=1.0, eos_token_id=stop_ids, pad_token_id=pad)
    stops = stop_sequences(model, encoder)
    responses = []
    for (job, _), sampled in zip(batch, out[:, ids.shape[1]:].tolist()):
        rejected = encoder.response_ids(decode_response(model.tokenizer, cut_at_stop(sampled, stops)[0]))
        responses.append((encoder.response_ids(job.example.response), rejected))
    pair_kept = kept_histories([job for job, _ in batch], [job.example.persona for job, _ in batch],
                               [max(map(len, ids)) for ids in responses], context_limit(model, args.max_length),
                               encoder, nested=nested, within=[history for _, history in batch])
    rows = []
    for (job, _), (chosen, rejected), pair_history in zip(batch, responses, pair_kept):
        if pair_history is not None:
            prompt = encoder.prompt_ids(job.example.persona, pair_history)
            rows += [(prompt, chosen), (prompt, rejected)]
    if rows:
        reference_logps(torch_model, rows, pad)
    return len(rows) // 2


def peer(args: argparse.Namespace, jobs: list, layout: str, model, encoder) -> dict:
    import torch
    import transformers

    from pdpo_jax.model import eos_ids

    torch.manual_seed(0)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
    stop_ids = list(eos_ids(model))
    batches = [jobs[i : i + args.batch] for i in range(0, len(jobs), args.batch)]
    peer_batch(args, batches[0][:2], layout, torch_model, model, encoder, stop_ids)  # warm-up: one-off set-up untimed

    def run():
        return sum(peer_batch(args, batch, layout, torch_model, model, encoder, stop_ids) for batch in batches)

    records, seconds = timed(run)
    return {"records": records, "seconds": seconds, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from pdpo_jax.data import PromptEncoder, load_dialogues
    from pdpo_jax.model import load_model
    from pdpo_jax.model.digest import model_digest
    from pdpo_jax.prefs import Side, plan_split

    if not Path(args.data).is_file():
        raise SystemExit(f"no dialogue file at {args.data} (pass --data)")
    dialogues = load_dialogues(args.data)[: args.dialogues]
    jobs = plan_split(dialogues, shuffle=True, seed=0)
    model = load_model(args.model, compute_dtype="float32")
    encoder = PromptEncoder(model.tokenizer, "chat-en")
    side = Side(args.model, model, encoder, model_digest(model), None)
    print(f"model: {model.path} ({model.config.model_type}, {model.config.num_layers} layers, fp32); "
          f"{len(dialogues)} dialogues of {args.data}, {len(jobs)} examples; batch {args.batch}, "
          f"top-p {TOP_P}, <= {args.new_tokens} new tokens, max_length {args.max_length}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}; {huge_pages_setting()}")
    rates = {}
    for layout in (LAYOUTS if args.layout == "both" else (args.layout,)):
        result = ours(args, jobs, side, layout)
        rates[layout] = result["records"] / result["seconds"]
        print(f"ours ({layout}): {rates[layout]:8.2f} records/s ({result['records']} records in "
              f"{result['seconds']:.1f} s; compile {result['compile_s']:.1f} s; {result['rejected_tokens']} rejected tokens)")
    if args.skip_torch:
        return 0
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    compared = "tree" if "tree" in rates else args.layout  # the peer gets the prompts of the layout compared
    theirs = peer(args, jobs, compared, model, encoder)
    peer_rate = theirs["records"] / theirs["seconds"]
    print(f"peer (transformers generate + TRL-style reference forward, torch {torch.__version__}, "
          f"{theirs['threads']} threads): {peer_rate:8.2f} records/s ({theirs['records']} records in "
          f"{theirs['seconds']:.1f} s)")
    print(f"prefs_speedup={rates[compared] / peer_rate:.2f}")
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()  # ours and the peer alike: both run in this process or its children
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
