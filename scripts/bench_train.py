"""Train-step throughput and peak memory: our jitted DPO/SFT steps against TRL and plain PyTorch.

    python scripts/bench_train.py [--model DIR] [--data FILE] [--warmup 2] [--steps 5] [--quick]

One run, one machine, one model (default: the bundled SmolLM2-135M-Instruct), fp32, the same
token ids on every side. Each configuration runs in its own subprocess, so peak RSS figures do not
mix and torch and JAX never share a process (or its thread pools):

DPO (pairs/s; `--pairs` pairs of a ~`--prompt-tokens` prompt and ~`--response-tokens` responses,
the paper's optimizer: AdamW lr 1e-6, weight decay 0.1, clip 1.0, beta 0.5):
  ours-unshared   `jit_train_step(dpo_objective)`, rows [prompt | chosen], [prompt | rejected]
  ours-shared     the same step on the shared-prompt layout [prompt | chosen | rejected]
  trl-live        TRL `DPOTrainer.train()` with its default live reference model
  trl-precomputed TRL with `precompute_ref_log_probs=True` (reference scored before training)
Our reference log-probs are computed once before the timed steps, like TRL's precompute.

SFT (tokens/s over the batch's real tokens, and scored response tokens/s; AdamW lr 1e-5):
  ours-per-turn   `jit_train_step(sft_objective)` on `--sft-rows` per-turn rows of <= `--sft-length`
  torch           transformers AutoModelForCausalLM + torch AdamW + clip_grad_norm_, labels=-100
                  outside responses, on exactly the same rows
  ours-packed     whole dialogues packed into rows of `--sft-length` (different rows: compare the
                  scored tokens/s, not tokens/s)

Timing: `--warmup` steps (compile included for us; compile time is printed separately), then
`--steps` timed optimizer steps. TRL steps are timed by a callback from `on_step_begin` to
`on_step_end` (forward, backward, clipping, optimizer step). Memory: peak process RSS of each
subprocess, and for our steps XLA's memory analysis of the compiled step (arguments + temporaries
+ outputs not aliased to the donated arguments).

`--quick` uses a tiny random Llama model (with the bundled tokenizer) and short sequences: a smoke
run, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdpo_jax.huge_pages import describe as huge_pages_setting, restart_with_huge_pages  # noqa: E402

PERSONACHAT_FILE = Path("data") / "personachat" / "valid_self_original_no_cands.txt"
# The staged data sits in a `shared/` folder beside the checkout, or beside the folder of checkouts.
DEFAULT_DATA = next((p for p in (Path(__file__).resolve().parents[i] / "shared" / PERSONACHAT_FILE for i in (2, 3))
                     if p.is_file()), Path(__file__).resolve().parents[2] / "shared" / PERSONACHAT_FILE)
DPO_CONFIGS = ("dpo-ours-unshared", "dpo-ours-shared", "dpo-trl-live", "dpo-trl-precomputed")
SFT_CONFIGS = ("sft-ours-per-turn", "sft-torch", "sft-ours-packed")
CONFIGS = DPO_CONFIGS + SFT_CONFIGS
RESULT_PREFIX = "BENCH_RESULT "
DPO_BETA = 0.5
DPO_LR, SFT_LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-6, 1e-5, 0.1, 1.0
FILLER_WORDS = ("i", "like", "to", "read", "books", "about", "dogs", "and", "my", "favorite", "food", "is", "pizza",
                "we", "went", "hiking", "last", "summer", "near", "the", "lake", "with", "friends", "it", "was", "fun")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face model directory with tokenizer files (default: the bundled model)")
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="PersonaChat-style dialogue file for the pairs and SFT rows (generated text when absent)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--pairs", type=int, default=4, help="DPO preference pairs per step")
    parser.add_argument("--prompt-tokens", type=int, default=150, help="approximate DPO prompt length")
    parser.add_argument("--response-tokens", type=int, default=20, help="approximate DPO response length")
    parser.add_argument("--sft-rows", type=int, default=4, help="SFT rows per step")
    parser.add_argument("--sft-length", type=int, default=256, help="SFT row length")
    parser.add_argument("--only", nargs="+", choices=CONFIGS, help="run only these configurations")
    parser.add_argument("--quick", action="store_true", help="tiny random model and short sequences (smoke run)")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the first step compiles)")
    if args.quick:
        args.prompt_tokens, args.response_tokens = min(args.prompt_tokens, 100), min(args.response_tokens, 12)
        args.sft_length = min(args.sft_length, 128)
    return args


# --- shared inputs (rebuilt identically in every subprocess) -----------------------------------------


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prompt_encoder(tokenizer):
    from pdpo_jax.data import PromptEncoder

    return PromptEncoder(tokenizer, "chat-en" if getattr(tokenizer, "chat_template", None) else "plain-en")


def load_examples(path: str) -> list:
    """Per-turn examples of the dialogue file, or [] when it is absent (generated text is used instead)."""
    from pdpo_jax.data import examples_from_dialogues, load_dialogues

    if not Path(path).is_file():
        return []
    return examples_from_dialogues(load_dialogues(path))


def generated_text(rng, words: int) -> str:
    return " ".join(FILLER_WORDS[i] for i in rng.integers(0, len(FILLER_WORDS), words)) + "."


def dpo_pairs(args: argparse.Namespace, tokenizer) -> tuple[list, str]:
    """`(pairs, source)`: `args.pairs` PairIds with prompts of ~prompt_tokens and responses of
    ~response_tokens; rejected is the response of another example."""
    import numpy as np

    from pdpo_jax.data import PairIds

    encoder = prompt_encoder(tokenizer)
    target_prompt, target_response = args.prompt_tokens, args.response_tokens
    candidates: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    examples = load_examples(args.data)
    for example in examples:
        response = tuple(encoder.response_ids(example.response))
        if abs(len(response) - target_response) > max(2, target_response // 4):
            continue
        try:
            prompt, _ = encoder.fit_prompt(example.persona, example.history, 0, target_prompt)
        except ValueError:
            continue
        if len(prompt) >= 0.85 * target_prompt:
            candidates.append((prompt, response))
        if len(candidates) == 2 * args.pairs:
            break
    source = f"{args.data} ({encoder.template.kind} template)"
    if len(candidates) < 2 * args.pairs:
        rng = np.random.default_rng(0)
        candidates = []
        for _ in range(2 * args.pairs):
            prompt = tuple(tokenizer(generated_text(rng, 2 * target_prompt), add_special_tokens=False)["input_ids"])[:target_prompt]
            response = tuple(encoder.response_ids(" " + generated_text(rng, target_response)))  # no merge with the prompt
            candidates.append((prompt, response))
        source = "generated text" + (f" ({args.data} gave too few fitting examples)" if examples else "")
    pairs = [
        PairIds(prompt, chosen, candidates[i + args.pairs][1], pair_id=str(i))
        for i, (prompt, chosen) in enumerate(candidates[: args.pairs])
    ]
    return pairs, source


def sft_rows(args: argparse.Namespace, tokenizer) -> tuple[list, str]:
    """`args.sft_rows` per-turn TokenizedExamples of 75-100% of sft_length tokens."""
    import numpy as np

    from pdpo_jax.data import TokenizedExample

    encoder = prompt_encoder(tokenizer)
    rows = []
    for example in load_examples(args.data):
        try:
            tokenized = encoder.encode(example, args.sft_length)
        except ValueError:
            continue
        if len(tokenized) >= 0.75 * args.sft_length:
            rows.append(tokenized)
        if len(rows) == args.sft_rows:
            return rows, f"{args.data} per-turn examples"
    rng = np.random.default_rng(1)
    rows = []
    for i in range(args.sft_rows):
        response = tuple(encoder.response_ids(generated_text(rng, 20)))
        prompt = tuple(tokenizer(generated_text(rng, 2 * args.sft_length), add_special_tokens=False)["input_ids"])
        rows.append(TokenizedExample(str(i), prompt[: args.sft_length - len(response)], response))
    return rows, "generated text"


def packed_rows(args: argparse.Namespace, tokenizer) -> list | None:
    from pdpo_jax.data import load_dialogues, pack_dialogues

    if not Path(args.data).is_file():
        return None
    rows = pack_dialogues(load_dialogues(args.data)[: 8 * args.sft_rows], prompt_encoder(tokenizer), args.sft_length,
                          on_overflow="skip")
    return rows[: args.sft_rows] if len(rows) >= args.sft_rows else None


# --- measurement helpers -----------------------------------------------------------------------------


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timing_summary(step_seconds: list[float], warmup: int) -> dict[str, float]:
    timed = step_seconds[warmup:]
    return {"step_s": sum(timed) / len(timed), "first_step_s": step_seconds[0], "timed_steps": len(timed)}


def xla_memory(compiled) -> dict[str, float]:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    mib = lambda n: n / 2**20  # noqa: E731
    return {
        "xla_args_mib": mib(analysis.argument_size_in_bytes),
        "xla_temp_mib": mib(analysis.temp_size_in_bytes),
        "xla_peak_mib": mib(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
                            + analysis.output_size_in_bytes - analysis.alias_size_in_bytes),
    }


# --- our steps ---------------------------------------------------------------------------------------


def run_our_step(args: argparse.Namespace, config, params, objective, optimizer, host_batch: dict) -> dict[str, Any]:
    """Compiles and times `jit_train_step(objective)` on one fixed micro-batch, laid out as the
    training loop's `StepBatches` lays it out (a stack with its scored positions)."""
    import jax

    from pdpo_jax.data import with_scored_positions
    from pdpo_jax.train.steps import create_train_state, jit_train_step, put_micro_batches

    batch = put_micro_batches(with_scored_positions({key: value[None] for key, value in host_batch.items()}))
    state = create_train_state(params, optimizer)
    start = time.perf_counter()
    compiled = jit_train_step(objective, optimizer).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    step_seconds, losses = [], []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        step_seconds.append(time.perf_counter() - start)
        losses.append(float(metrics["loss"][0] / metrics["loss"][1]))
    return {"compile_s": compile_s, **timing_summary(step_seconds, args.warmup), **xla_memory(compiled),
            "loss_first": losses[0], "loss_last": losses[-1]}


def load_ours(model_dir: str):
    from pdpo_jax.model import load_model

    loaded = load_model(model_dir)
    return loaded.config.replace(dtype="float32"), loaded.params


def child_dpo_ours(args: argparse.Namespace, share_prompt: bool) -> dict[str, Any]:
    import jax

    from pdpo_jax.data import dpo_batch, with_scored_positions
    from pdpo_jax.config import DPO_DEFAULTS
    from pdpo_jax.train.optim import make_optimizer
    from pdpo_jax.scoring import sequence_scores
    from pdpo_jax.train.steps import DPOSettings, dpo_objective

    tokenizer = load_tokenizer(args.model)
    pairs, source = dpo_pairs(args, tokenizer)
    config, params = load_ours(args.model)
    rss_loaded = current_rss_mib()
    pad_id = tokenizer.pad_token_id

    # The frozen reference's log-probs, once and untimed (what TRL's precompute does too).
    unshared = dpo_batch(pairs, pad_id=pad_id, bucket=8, share_prompt=False)
    score = jax.jit(partial(sequence_scores, config=config, num_sequences=2 * len(pairs)))
    start = time.perf_counter()
    ref_batch = with_scored_positions({k: v for k, v in unshared.items() if k != "pair_mask"})
    ref_logps = jax.device_get(score(params, batch=ref_batch)[0])
    reference_s = time.perf_counter() - start
    pairs = [dataclasses.replace(pair, ref_chosen_logps=float(ref_logps[2 * i]), ref_rejected_logps=float(ref_logps[2 * i + 1]))
             for i, pair in enumerate(pairs)]

    host_batch = dpo_batch(pairs, pad_id=pad_id, bucket=8, share_prompt=share_prompt)
    optimizer, _ = make_optimizer(dataclasses.replace(DPO_DEFAULTS, learning_rate=DPO_LR, weight_decay=WEIGHT_DECAY,
                                                      max_grad_norm=MAX_GRAD_NORM), args.warmup + args.steps)
    objective = partial(dpo_objective, config=config, settings=DPOSettings(beta=DPO_BETA))
    result = run_our_step(args, config, params, objective, optimizer, host_batch)
    return {**result, "items_per_step": len(pairs), "unit": "pairs/s", "source": source,
            "batch_shape": list(host_batch["input_ids"].shape), "reference_s": reference_s,
            "real_tokens": int((host_batch["segment_ids"] != 0).sum()), "rss_loaded_mib": rss_loaded,
            "pair_tokens": [[len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)] for p in pairs]}


def child_sft_ours(args: argparse.Namespace, packed: bool) -> dict[str, Any]:
    from pdpo_jax.data import packed_batch, per_turn_batch
    from pdpo_jax.config import SFT_DEFAULTS
    from pdpo_jax.train.optim import make_optimizer
    from pdpo_jax.train.steps import sft_objective

    tokenizer = load_tokenizer(args.model)
    if packed:
        rows = packed_rows(args, tokenizer)
        if rows is None:
            return {"skipped": f"fewer than {args.sft_rows} packed rows of {args.sft_length} tokens from {args.data}"}
        host_batch, source = packed_batch(rows, pad_to=args.sft_length, pad_id=tokenizer.pad_token_id), "packed dialogues"
    else:
        rows, source = sft_rows(args, tokenizer)
        host_batch = per_turn_batch(rows, pad_to=args.sft_length, pad_id=tokenizer.pad_token_id)
    config, params = load_ours(args.model)
    rss_loaded = current_rss_mib()
    optimizer, _ = make_optimizer(dataclasses.replace(SFT_DEFAULTS, learning_rate=SFT_LR), args.warmup + args.steps)
    result = run_our_step(args, config, params, partial(sft_objective, config=config), optimizer, host_batch)
    return {**result, **sft_counts(host_batch), "source": source, "rss_loaded_mib": rss_loaded}


def sft_counts(host_batch: dict) -> dict[str, Any]:
    return {"unit": "tokens/s", "batch_shape": list(host_batch["input_ids"].shape),
            "items_per_step": int((host_batch["segment_ids"] != 0).sum()),
            "real_tokens": int((host_batch["segment_ids"] != 0).sum()),
            "scored_tokens": int(host_batch["loss_mask"].sum())}


# --- PyTorch and TRL ---------------------------------------------------------------------------------


def torch_setup():
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    return torch


def child_sft_torch(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    torch = torch_setup()
    import transformers

    from pdpo_jax.data import per_turn_batch

    tokenizer = load_tokenizer(args.model)
    rows, source = sft_rows(args, tokenizer)
    host_batch = per_turn_batch(rows, pad_to=args.sft_length, pad_id=tokenizer.pad_token_id)
    input_ids = torch.as_tensor(host_batch["input_ids"], dtype=torch.long)
    labels = np.full(host_batch["input_ids"].shape, -100, np.int64)  # label t is predicted at t - 1
    labels[:, 1:] = np.where(host_batch["loss_mask"][:, :-1] > 0, host_batch["input_ids"][:, 1:], -100)
    inputs = {"input_ids": input_ids, "attention_mask": torch.as_tensor(host_batch["segment_ids"] != 0, dtype=torch.long),
              "position_ids": torch.as_tensor(host_batch["positions"], dtype=torch.long), "labels": torch.as_tensor(labels)}

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    rss_loaded = current_rss_mib()
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    step_seconds, losses = [], []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {**timing_summary(step_seconds, args.warmup), **sft_counts(host_batch), "source": source,
            "loss_first": losses[0], "loss_last": losses[-1], "rss_loaded_mib": rss_loaded,
            "threads": torch.get_num_threads()}


def child_dpo_trl(args: argparse.Namespace, precompute: bool) -> dict[str, Any]:
    torch = torch_setup()
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = load_tokenizer(args.model)
    pairs, source = dpo_pairs(args, tokenizer)
    decode = partial(tokenizer.decode, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    dataset = Dataset.from_dict({"prompt": [decode(p.prompt_ids) for p in pairs],
                                 "chosen": [decode(p.chosen_ids) for p in pairs],
                                 "rejected": [decode(p.rejected_ids) for p in pairs]})

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.started = 0.0

        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.started)

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rss_loaded = current_rss_mib()
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="bench_train_trl_") as out_dir:
        config = DPOConfig(
            output_dir=out_dir, per_device_train_batch_size=len(pairs), gradient_accumulation_steps=1,
            max_steps=args.warmup + args.steps, learning_rate=DPO_LR, weight_decay=WEIGHT_DECAY,
            max_grad_norm=MAX_GRAD_NORM, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            lr_scheduler_type="linear", beta=DPO_BETA, loss_type=["sigmoid"], max_length=None,
            precompute_ref_log_probs=precompute, bf16=False, fp16=False, gradient_checkpointing=False,
            use_cpu=True, report_to=[], dataloader_num_workers=0, save_strategy="no", logging_strategy="no",
            eval_strategy="no", disable_tqdm=True, seed=0,
        )
        start = time.perf_counter()
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[timer])
        setup_s = time.perf_counter() - start
        trl_tokens = [[len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"])]
                      for row in trainer.train_dataset]
        output = trainer.train()
    ours_tokens = [[len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)] for p in pairs]
    return {**timing_summary(timer.seconds, args.warmup), "items_per_step": len(pairs), "unit": "pairs/s",
            "source": source, "setup_s": setup_s, "ours_pair_tokens": ours_tokens, "rss_loaded_mib": rss_loaded, "threads": torch.get_num_threads(),
            "pair_tokens": trl_tokens, "same_tokens_as_ours": trl_tokens == ours_tokens,
            "live_reference": trainer.ref_model is not None, "train_loss": float(output.training_loss)}


CHILDREN = {
    "dpo-ours-unshared": partial(child_dpo_ours, share_prompt=False),
    "dpo-ours-shared": partial(child_dpo_ours, share_prompt=True),
    "dpo-trl-live": partial(child_dpo_trl, precompute=False),
    "dpo-trl-precomputed": partial(child_dpo_trl, precompute=True),
    "sft-ours-per-turn": partial(child_sft_ours, packed=False),
    "sft-ours-packed": partial(child_sft_ours, packed=True),
    "sft-torch": child_sft_torch,
}


def run_child(args: argparse.Namespace) -> int:
    result = CHILDREN[args.child](args)
    result["peak_rss_mib"] = peak_rss_mib()
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# --- the parent: subprocesses, table, ratios ---------------------------------------------------------


def make_tiny_model(out_dir: Path, tokenizer_dir: str) -> str:
    """A 2-layer random Llama with the given tokenizer, saved like a downloaded checkpoint."""
    import torch
    import transformers

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def child_command(args: argparse.Namespace, name: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--model", args.model, "--data", args.data,
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--pairs", str(args.pairs),
               "--prompt-tokens", str(args.prompt_tokens), "--response-tokens", str(args.response_tokens),
               "--sft-rows", str(args.sft_rows), "--sft-length", str(args.sft_length)]
    return command + (["--quick"] if args.quick else [])


def run_config(args: argparse.Namespace, name: str) -> dict[str, Any]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    start = time.perf_counter()
    process = subprocess.run(child_command(args, name), capture_output=True, text=True, env=env)
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode != 0 or not lines:
        tail = "\n".join((process.stdout + process.stderr).strip().splitlines()[-25:])
        return {"error": f"exit {process.returncode}:\n{tail}"}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["wall_s"] = time.perf_counter() - start
    return result


def throughput(result: dict[str, Any], scored: bool = False) -> float | None:
    if "step_s" not in result:
        return None
    items = result["scored_tokens"] if scored else result["items_per_step"]
    return items / result["step_s"]


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict[str, dict[str, Any]]) -> None:
    header = (f"{'configuration':<20} {'throughput':>16} {'scored tok/s':>12} {'ms/step':>9} {'compile s':>9} "
              f"{'peak RSS MiB':>12} {'XLA peak MiB':>12}  batch")
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        if "error" in result or "skipped" in result:
            print(f"{name:<20} {'skipped: ' + result['skipped'] if 'skipped' in result else 'FAILED (see below)'}")
            continue
        rate = f"{throughput(result):.2f} {result['unit']}"
        scored = throughput(result, scored=True) if "scored_tokens" in result else None
        print(f"{name:<20} {rate:>16} {fmt(scored, '12.1f')} {result['step_s'] * 1000:9.0f} "
              f"{fmt(result.get('compile_s'), '9.1f')} {result['peak_rss_mib']:12.0f} "
              f"{fmt(result.get('xla_peak_mib'), '12.0f')}  {'x'.join(map(str, result.get('batch_shape', []))) or '-'}")


def print_ratios(results: dict[str, dict[str, Any]]) -> None:
    def ratio(ours: str, theirs: str, scored: bool = False) -> str:
        a = throughput(results.get(ours, {}), scored)
        b = throughput(results.get(theirs, {}), scored)
        return "n/a" if a is None or b is None else f"{a / b:.2f}x"

    print("\nratios (throughput ours / theirs; targets: >= 1.5x TRL live, >= 1.0x TRL precomputed, >= 1.0x PyTorch SFT)")
    for ours in ("dpo-ours-unshared", "dpo-ours-shared"):
        print(f"  {ours:<18} / dpo-trl-live:        {ratio(ours, 'dpo-trl-live'):>7}    "
              f"/ dpo-trl-precomputed: {ratio(ours, 'dpo-trl-precomputed'):>7}")
    print(f"  sft-ours-per-turn  / sft-torch:           {ratio('sft-ours-per-turn', 'sft-torch'):>7}  (same rows, tokens/s)")
    print(f"  sft-ours-packed    / sft-torch:           {ratio('sft-ours-packed', 'sft-torch', scored=True):>7}  "
          "(scored response tokens/s; packed rows hold more responses)")


def print_details(results: dict[str, dict[str, Any]]) -> None:
    print("\ndetails")
    for name, result in results.items():
        if "error" in result:
            print(f"  {name}: {result['error']}")
            continue
        if "skipped" in result:
            continue
        extras = [f"first step {result['first_step_s']:.1f} s", f"RSS after load {result['rss_loaded_mib']:.0f} MiB",
                  f"wall {result['wall_s']:.0f} s"]
        for key, label in (("loss_first", "loss first"), ("loss_last", "last"), ("train_loss", "train loss"),
                           ("setup_s", "trainer setup s"), ("reference_s", "reference scoring s"),
                           ("xla_args_mib", "XLA args MiB"), ("xla_temp_mib", "XLA temp MiB"), ("threads", "torch threads"),
                           ("live_reference", "live reference"), ("same_tokens_as_ours", "same tokens as ours"),
                           ("real_tokens", "real tokens"), ("scored_tokens", "scored tokens")):
            if key in result:
                value = result[key]
                extras.append(f"{label} {value:.3g}" if isinstance(value, float) else f"{label} {value}")
        print(f"  {name}: " + ", ".join(extras))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    from pdpo_jax.model.default_model import default_model_dir

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        if args.quick:
            args.model = make_tiny_model(Path(tmp) / "tiny-llama", args.model or str(default_model_dir()))
        elif args.model is None:
            args.model = str(default_model_dir())
        import jax
        import torch
        import trl

        print(f"model: {args.model}{' (tiny random, --quick: figures are meaningless)' if args.quick else ''}")
        print(f"fp32; {args.warmup} warm-up + {args.steps} timed steps per configuration, each in its own subprocess; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {huge_pages_setting()}")
        print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, trl {trl.__version__}")
        print(f"DPO: {args.pairs} pairs, prompt ~{args.prompt_tokens} and responses ~{args.response_tokens} tokens, "
              f"AdamW lr {DPO_LR} wd {WEIGHT_DECAY} clip {MAX_GRAD_NORM}, beta {DPO_BETA}; "
              f"SFT: {args.sft_rows} rows x {args.sft_length}, lr {SFT_LR}", flush=True)
        results: dict[str, dict[str, Any]] = {}
        for name in args.only or CONFIGS:
            print(f"running {name} ...", flush=True)
            results[name] = run_config(args, name)
    first_dpo = next((r for n, r in results.items() if n.startswith("dpo") and "source" in r), None)
    first_sft = next((r for n, r in results.items() if n.startswith("sft") and "source" in r), None)
    if first_dpo:
        print(f"DPO pairs from {first_dpo['source']}; (prompt, chosen, rejected) tokens {first_dpo.get('pair_tokens')}")
    if first_sft:
        print(f"SFT rows from {first_sft['source']}")
    print()
    print_table(results)
    print_ratios(results)
    print_details(results)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    restart_with_huge_pages()  # ours and the peer alike: both run in this process or its children
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
