"""Tiny models and synthetic batches in the layout of docs/design.md, for the training tests.

Batches are built here directly (numpy, per-turn rows `[prompt | response]`), independent of the
data pipeline. The tasks are learnable: a response is a fixed function of its prompt, so SFT can
lower the validation loss and DPO can learn to prefer the pattern over a random rejected response.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pdpo_jax.model import ModelConfig

VOCAB = 64
BOS, EOS = 1, 2
FIRST_WORD = 3  # ids 0..2 are pad/bos/eos
PAIR_KEYS = ("ref_chosen_logps", "ref_rejected_logps", "pair_mask")


def tiny_llama_config(**overrides: Any) -> ModelConfig:
    fields = dict(
        family="llama", model_type="llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64, norm_eps=1e-6,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0,
    )
    return ModelConfig(**(fields | overrides))


def random_params(config: ModelConfig, seed: int = 0, scale: float = 0.1) -> Any:
    """Random fp32 parameters drawn on the host (no compilation): kernels and embeddings
    N(0, scale), norm weights near 1."""
    from flax import traverse_util

    from pdpo_jax.model.decoder import param_shapes

    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(param_shapes(config), sep="/")
    values = {}
    for path, leaf in sorted(flat.items()):
        if path.endswith("weight") or path.endswith("scale"):
            values[path] = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        else:
            values[path] = scale * rng.standard_normal(leaf.shape)
    return traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in values.items()}, sep="/")


def write_model_dir(out_dir: Path, config: ModelConfig) -> Path:
    """A model directory without weights: config.json and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    vocab = {"<pad>": 0, "<s>": BOS, "</s>": EOS} | {f"w{i}": i for i in range(FIRST_WORD, config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    ))
    return out_dir


def next_word(word: np.ndarray | int) -> np.ndarray:
    """A fixed permutation of the words (5 is coprime with their count)."""
    return (np.asarray(word) - FIRST_WORD) * 5 % (VOCAB - FIRST_WORD) + FIRST_WORD


def pattern_response(prompt: np.ndarray, length: int) -> np.ndarray:
    """The learnable rule: the response continues the chain `next_word` from the prompt's last word,
    so it is a fixed function of the prompt."""
    words = [next_word(prompt[-1])]
    for _ in range(length - 1):
        words.append(next_word(words[-1]))
    return np.asarray(words, np.int32)


def random_prompt(rng: np.random.Generator, length: int) -> np.ndarray:
    return np.concatenate([[BOS], rng.integers(FIRST_WORD, VOCAB, size=length - 1)]).astype(np.int32)


def layout_rows(rows: list[tuple[np.ndarray, np.ndarray]], width: int) -> dict[str, np.ndarray]:
    """Per-turn rows `[prompt | response EOS]`, right-padded to `width`; sequence id = row index.

    targets are the row shifted left by one; the loss covers the targets that are response tokens
    or the EOS, i.e. indices `len(prompt) - 1 .. len(row) - 2`.
    """
    n = len(rows)
    batch = {
        "input_ids": np.zeros((n, width), np.int32),
        "positions": np.zeros((n, width), np.int32),
        "segment_ids": np.zeros((n, width), np.int32),
        "branch_ids": np.zeros((n, width), np.int32),
        "targets": np.zeros((n, width), np.int32),
        "loss_mask": np.zeros((n, width), np.float32),
        "sequence_ids": np.full((n, width), -1, np.int32),
    }
    for r, (prompt, response) in enumerate(rows):
        tokens = np.concatenate([prompt, response, [EOS]]).astype(np.int32)
        length = len(tokens)
        if length > width:
            raise ValueError(f"row {r} has {length} tokens, more than the width {width}")
        batch["input_ids"][r, :length] = tokens
        batch["positions"][r, :length] = np.arange(length)
        batch["segment_ids"][r, :length] = 1
        batch["targets"][r, : length - 1] = tokens[1:]
        scored = slice(len(prompt) - 1, length - 1)
        batch["loss_mask"][r, scored] = 1.0
        batch["sequence_ids"][r, scored] = r
    return batch


def sft_batch(seed: int, rows: int, width: int = 24, prompt_lengths=(4, 9), response_lengths=(2, 11)) -> dict[str, np.ndarray]:
    """Rows whose responses follow `pattern_response`, with prompts and responses of varied length."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(rows):
        prompt = random_prompt(rng, int(rng.integers(*prompt_lengths)))
        pairs.append((prompt, pattern_response(prompt, int(rng.integers(*response_lengths)))))
    return layout_rows(pairs, width)


def dpo_batch(seed: int, pairs: int, width: int = 24, padding_pairs: int = 0) -> dict[str, np.ndarray]:
    """Rows 2i (chosen: the pattern) and 2i+1 (rejected: random words, same prompt), reference
    log-probs left at zero (fill them with `with_reference_logps`). The last `padding_pairs` pairs
    are marked padding by `pair_mask`."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(pairs):
        prompt = random_prompt(rng, int(rng.integers(4, 9)))
        chosen = pattern_response(prompt, int(rng.integers(3, 9)))
        rejected = rng.integers(FIRST_WORD, VOCAB, size=int(rng.integers(3, 9))).astype(np.int32)
        rows += [(prompt, chosen), (prompt, rejected)]
    batch = layout_rows(rows, width)
    batch["ref_chosen_logps"] = np.zeros(pairs, np.float32)
    batch["ref_rejected_logps"] = np.zeros(pairs, np.float32)
    if padding_pairs:
        batch["pair_mask"] = (np.arange(pairs) < pairs - padding_pairs).astype(np.float32)
    return batch


def with_reference_logps(batch: dict[str, np.ndarray], score_fn) -> dict[str, np.ndarray]:
    """Fills `ref_*_logps` from `score_fn(batch) -> [2 * pairs]` summed log-probs (chosen 2i)."""
    logps = np.asarray(score_fn(batch))
    return dict(batch, ref_chosen_logps=logps[0::2].astype(np.float32), ref_rejected_logps=logps[1::2].astype(np.float32))


def micro_batches(batch: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """Splits a layout batch into `count` micro-batches stacked on a new leading axis.

    Rows (and pair arrays) are cut into equal consecutive chunks; sequence ids are renumbered from 0
    inside each chunk, as a data pipeline would number them per micro-batch.
    """
    rows = batch["input_ids"].shape[0]
    if rows % count:
        raise ValueError(f"{rows} rows do not split into {count} micro-batches")
    per_chunk = rows // count
    stacked: dict[str, list[np.ndarray]] = {key: [] for key in batch}
    for chunk in range(count):
        for key, value in batch.items():
            size = value.shape[0] // count
            part = value[chunk * size : (chunk + 1) * size]
            if key == "sequence_ids":
                part = np.where(part >= 0, part - chunk * per_chunk, -1).astype(np.int32)
            stacked[key].append(part)
    return {key: np.stack(parts) for key, parts in stacked.items()}


def single_micro_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return micro_batches(batch, 1)


class FixedEpochBatches:
    """`run_loop`'s EpochBatches over a fixed list of micro-batch stacks, reshuffled each epoch by seed."""

    def __init__(self, stacks: list[dict[str, np.ndarray]], seed: int = 0):
        self.stacks = stacks
        self.seed = seed

    def steps_per_epoch(self) -> int:
        return len(self.stacks)

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.stacks))
        return self.stacks[int(order[index])]
